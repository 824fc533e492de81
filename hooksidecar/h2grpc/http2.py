"""The server side of one HTTP/2 connection (RFC 9113), restricted to what a gRPC client sends.

Why not the ``h2`` package: measured per connection (``python -m benchmarks sidecar``, the h2
figures in docs/ARCHITECTURE.md), h2's general state machine cost about as much as the hook call
itself: frame and event objects, per-frame logging, header validation generators and settings
objects on every connection. A gRPC unary client sends a handful of frames per call, so this module
handles exactly the frames and states such a client can produce, strictly, and leaves HPACK to the
``hpack`` package (the library h2 itself uses).

What a client may send, and what it gets for the rest:

- the preface, then SETTINGS (acknowledged; values out of range are connection errors), then
  HEADERS (+ CONTINUATION) opening a stream with an odd, increasing id, DATA, trailers (HEADERS with
  END_STREAM), RST_STREAM, PING (answered), WINDOW_UPDATE, PRIORITY (ignored), GOAWAY (ends the
  connection); unknown frame types are ignored (RFC 9113 5.5) except inside a header block;
- a **connection error** (GOAWAY with the code, then the caller closes) for: a wrong preface or first
  frame, a frame larger than 16 KiB (we never raise SETTINGS_MAX_FRAME_SIZE), a frame on the wrong
  stream (0 or not), wrong lengths of fixed-size frames, bad padding, a PUSH_PROMISE, an interrupted
  header block, a header block over :data:`MAX_HEADER_BLOCK_BYTES`, an HPACK error or a header list
  over ``max_header_list`` (the decoder's state is lost), more data than our windows allow, a
  window overflow, a frame on a stream never opened, a new stream with an even or lower id, or over
  the concurrent stream limit;
- a **stream error** (RST_STREAM PROTOCOL_ERROR, the connection goes on, the owner is told why:
  RST_STREAM carries no text; the server logs it as ``stream-error``) for a malformed header
  list (RFC 9113 8.2-8.3: upper case or non-token names, CR/LF/NUL in values, pseudo-headers
  unknown, repeated, after regular ones or missing, connection-specific headers, ``te`` other than
  ``trailers``), trailers without END_STREAM or with pseudo-headers, a stream that depends on
  itself (HEADERS or PRIORITY) and a WINDOW_UPDATE of 0 on a stream; RST_STREAM FLOW_CONTROL_ERROR
  for a stream's window that overflows.

DATA, WINDOW_UPDATE and RST_STREAM on a stream that was closed or reset are ignored (DATA still
counts against the connection's window and is credited back); HEADERS on one of the last
:data:`RESET_MEMORY` streams we reset is decoded (the HPACK state) and dropped, on another closed
stream it is a connection error. Our receive windows are given back as the data arrives
(the caller bounds what it buffers); the peer's windows and frame size bound what :meth:`send_data`
may send. Header blocks we send are given pre-encoded (:func:`encode_headers`: literals never
indexed, so our HPACK encoder has no state).
"""

from __future__ import annotations

import enum
import re
import struct
from collections.abc import Iterable
from typing import Protocol

import hpack
import hpack.exceptions

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = range(10)
FLAG_END_STREAM = FLAG_ACK = 0x1
FLAG_END_HEADERS = 0x4
FLAG_PADDED = 0x8
FLAG_PRIORITY = 0x20

DEFAULT_WINDOW = 65535
MAX_WINDOW = 2**31 - 1
FRAME_BYTES = 16384  # the largest frame we accept (SETTINGS_MAX_FRAME_SIZE left at its default)
MAX_HEADER_BLOCK_BYTES = 64 * 1024  # HEADERS + CONTINUATION of one block, before decoding
RESET_MEMORY = 64  # streams we reset whose late HEADERS are ignored rather than a connection error
SETTINGS_HEADER_TABLE_SIZE, SETTINGS_ENABLE_PUSH, SETTINGS_MAX_CONCURRENT_STREAMS = 1, 2, 3
SETTINGS_INITIAL_WINDOW_SIZE, SETTINGS_MAX_FRAME_SIZE, SETTINGS_MAX_HEADER_LIST_SIZE = 4, 5, 6

_HEAD = struct.Struct(">BHBBL")  # length (24 bits as 8 + 16), type, flags, R + stream id
_SETTING = struct.Struct(">HL")
_U32 = struct.Struct(">L")


class ErrorCode(enum.IntEnum):
    NO_ERROR = 0x0
    PROTOCOL_ERROR = 0x1
    INTERNAL_ERROR = 0x2
    FLOW_CONTROL_ERROR = 0x3
    SETTINGS_TIMEOUT = 0x4
    STREAM_CLOSED = 0x5
    FRAME_SIZE_ERROR = 0x6
    REFUSED_STREAM = 0x7
    CANCEL = 0x8
    COMPRESSION_ERROR = 0x9
    CONNECT_ERROR = 0xA
    ENHANCE_YOUR_CALM = 0xB
    INADEQUATE_SECURITY = 0xC
    HTTP_1_1_REQUIRED = 0xD


class ProtocolError(Exception):
    """The peer broke the protocol: the connection ends with GOAWAY ``code``."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code


class StreamClosed(Exception):
    """Sending on a stream that is closed (the peer reset it, or our side already ended it)."""


class Events(Protocol):
    """What the connection tells its owner, in the order the frames arrived."""

    def on_request(self, sid: int, headers: dict[bytes, bytes], ended: bool) -> None: ...
    def on_data(self, sid: int, data: bytes, ended: bool) -> None: ...
    def on_end(self, sid: int) -> None: ...
    def on_reset(self, sid: int) -> None: ...
    def on_goaway(self) -> None: ...
    def on_stream_error(self, sid: int, reason: str) -> None: ...


# ------------------------------------------------------------------------------------------------
# encoding
# ------------------------------------------------------------------------------------------------
def frame(kind: int, flags: int, sid: int, payload: bytes = b"") -> bytes:
    return _HEAD.pack(len(payload) >> 16, len(payload) & 0xFFFF, kind, flags, sid) + payload


def _hpack_int(value: int, prefix_bits: int, first: int) -> bytes:
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes([first | value])
    out = bytearray([first | limit])
    value -= limit
    while value >= 128:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def encode_headers(headers: Iterable[tuple[bytes, bytes]]) -> bytes:
    """A header block of literals never indexed, new names, no Huffman (RFC 7541 6.2.3): nothing
    enters either side's dynamic table, so the same fields always encode to the same bytes."""
    out = bytearray()
    for name, value in headers:
        out += b"\x10" + _hpack_int(len(name), 7, 0) + name + _hpack_int(len(value), 7, 0) + value
    return bytes(out)


#: starts the first header block we send on a connection: our encoder's table is 0 bytes, so no
#: later change of the peer's SETTINGS_HEADER_TABLE_SIZE can require an update from us
TABLE_SIZE_ZERO = b"\x20"


def server_preface(*, max_streams: int, window: int, max_header_list: int) -> bytes:
    """Our SETTINGS (push off, the stream limit, the stream window, the header list bound) and the
    connection window raised to ``window``: the same bytes for every connection."""
    settings = b"".join(_SETTING.pack(key, value) for key, value in (
        (SETTINGS_ENABLE_PUSH, 0), (SETTINGS_MAX_CONCURRENT_STREAMS, max_streams),
        (SETTINGS_INITIAL_WINDOW_SIZE, window), (SETTINGS_MAX_HEADER_LIST_SIZE, max_header_list)))
    out = frame(SETTINGS, 0, 0, settings)
    if window > DEFAULT_WINDOW:
        out += frame(WINDOW_UPDATE, 0, 0, _U32.pack(window - DEFAULT_WINDOW))
    return out


# ------------------------------------------------------------------------------------------------
# header lists (RFC 9113 8.2, 8.3)
# ------------------------------------------------------------------------------------------------
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9a-z]+")
_BAD_VALUE = re.compile(rb"[\x00\r\n]|\A[ \t]|[ \t]\Z")
_REQUEST_PSEUDO = frozenset((b":method", b":scheme", b":path", b":authority"))
_CONNECTION_SPECIFIC = frozenset((b"connection", b"proxy-connection", b"keep-alive", b"transfer-encoding",
                                  b"upgrade"))


def request_headers(fields: list[tuple[bytes, bytes]], *, trailers: bool) -> dict[bytes, bytes] | str:
    """The header list as a dict (the last of repeated regular fields wins), or why it is malformed."""
    out: dict[bytes, bytes] = {}
    regular = False
    for name, value in fields:
        if name[:1] == b":":
            if trailers:
                return f"pseudo-header {name!r} in trailers"
            if regular:
                return f"pseudo-header {name!r} after a regular field"
            if name not in _REQUEST_PSEUDO:
                return f"unknown pseudo-header {name!r}"
            if name in out:
                return f"repeated pseudo-header {name!r}"
        else:
            regular = True
            if not _TOKEN.fullmatch(name):
                return f"invalid field name {name!r}"
            if name in _CONNECTION_SPECIFIC:
                return f"connection-specific field {name!r}"
            if name == b"te" and value != b"trailers":
                return f"te: {value!r} (only 'trailers' is allowed)"
        if _BAD_VALUE.search(value):
            return f"invalid value of field {name!r}"
        out[name] = value
    if not trailers:
        for name in (b":method", b":scheme", b":path"):
            if not out.get(name):
                return f"missing pseudo-header {name.decode()}"
    return out


# ------------------------------------------------------------------------------------------------
# the connection
# ------------------------------------------------------------------------------------------------
_REQUEST, _TRAILERS, _IGNORED = range(3)  # what a header block is


class _Stream:
    __slots__ = ("receiving", "send_window", "sending", "unacked")

    def __init__(self, send_window: int, receiving: bool) -> None:
        self.receiving = receiving  # the client has not ended its side yet
        self.sending = True  # nor have we
        self.send_window = send_window
        self.unacked = 0  # bytes received and not yet given back by WINDOW_UPDATE


class ServerConnection:
    """One connection's HTTP/2 state. :meth:`receive` takes bytes as they come and reports to
    ``events``; the ``send_*`` methods queue frames; :meth:`data_to_send` hands them out."""

    def __init__(self, events: Events, *, preface: bytes, max_streams: int, window: int,
                 max_header_list: int) -> None:
        self.events = events
        self.max_streams = max_streams
        self.window = window  # our receive window, per stream and for the connection
        self._out: list[bytes] = [preface]
        self._buffer = bytearray()
        self._preface_seen = False
        self._settings_seen = False
        self._streams: dict[int, _Stream] = {}
        self._reset_ids: dict[int, None] = {}  # the streams we reset last, oldest first
        self._last_sid = 0  # the highest stream id the client opened
        self._block: bytearray | None = None  # a header block waiting for CONTINUATION
        self._block_sid = 0
        self._block_ended = False
        self._block_kind = _REQUEST
        self._block_problem = ""  # what makes the block's stream fail whatever its fields
        self._decoder = hpack.Decoder()
        self._decoder.max_header_list_size = max_header_list
        self._conn_unacked = 0
        self._send_window = DEFAULT_WINDOW  # the peer's connection window
        self._initial_send_window = DEFAULT_WINDOW
        self._max_frame = FRAME_BYTES  # the largest frame the peer accepts
        self._first_block = True
        self.ended = False  # GOAWAY sent or received: nothing more is read

    # -- output ---------------------------------------------------------------------------------
    def data_to_send(self) -> list[bytes]:
        out, self._out = self._out, []
        return out

    @property
    def max_outbound_frame_size(self) -> int:
        return self._max_frame

    def send_window(self, sid: int) -> int:
        stream = self._streams.get(sid)
        return 0 if stream is None else min(stream.send_window, self._send_window)

    def _sending(self, sid: int) -> _Stream:
        stream = self._streams.get(sid)
        if stream is None or not stream.sending:
            raise StreamClosed(f"stream {sid} is closed")
        return stream

    def send_headers(self, sid: int, block: bytes, *, end_stream: bool = False) -> None:
        """``block`` from :func:`encode_headers`; split into CONTINUATION frames when needed."""
        stream = self._sending(sid)
        if self._first_block:
            block, self._first_block = TABLE_SIZE_ZERO + block, False
        size = self._max_frame
        flags = FLAG_END_STREAM if end_stream else 0
        if len(block) <= size:
            self._out.append(frame(HEADERS, flags | FLAG_END_HEADERS, sid, block))
        else:
            pieces = [block[at:at + size] for at in range(0, len(block), size)]
            self._out.append(frame(HEADERS, flags, sid, pieces[0]))
            for n, piece in enumerate(pieces[1:], 2):
                self._out.append(frame(CONTINUATION, FLAG_END_HEADERS if n == len(pieces) else 0, sid, piece))
        if end_stream:
            self._close_sending(sid, stream)

    def send_data(self, sid: int, data: bytes, *, end_stream: bool = False) -> None:
        """One DATA frame; the caller keeps within :meth:`send_window` and the frame size."""
        stream = self._sending(sid)
        size = len(data)
        if size > min(stream.send_window, self._send_window, self._max_frame):
            raise ValueError(f"{size} bytes exceed the window or the frame size")
        stream.send_window -= size
        self._send_window -= size
        self._out.append(_HEAD.pack(size >> 16, size & 0xFFFF, DATA, FLAG_END_STREAM if end_stream else 0, sid))
        self._out.append(data)
        if end_stream:
            self._close_sending(sid, stream)

    def _close_sending(self, sid: int, stream: _Stream) -> None:
        if stream.receiving:
            stream.sending = False  # half-closed (local)
        else:
            del self._streams[sid]

    def reset(self, sid: int, code: ErrorCode) -> None:
        """RST_STREAM on an open stream, closed both ways from now on (later frames on it are
        ignored); nothing on a stream already closed."""
        if self._streams.pop(sid, None) is not None:
            self._rst(sid, code)

    def _stream_error(self, sid: int, code: ErrorCode, reason: str) -> None:
        """RST_STREAM ``code``; the owner is told of the reset (if it knew the stream) and why."""
        if self._streams.pop(sid, None) is not None:
            self._rst(sid, code)
            self.events.on_reset(sid)
        else:
            self._rst(sid, code)  # a new stream whose request headers are malformed
        self.events.on_stream_error(sid, f"{code.name}: {reason}")

    def _rst(self, sid: int, code: ErrorCode) -> None:
        self._out.append(frame(RST_STREAM, 0, sid, _U32.pack(code)))
        self._reset_ids[sid] = None  # its frames still in flight are ignored, not errors
        if len(self._reset_ids) > RESET_MEMORY:
            del self._reset_ids[next(iter(self._reset_ids))]

    def goaway(self, code: ErrorCode = ErrorCode.NO_ERROR, debug: bytes = b"") -> None:
        if not self.ended:
            self.ended = True
            self._out.append(frame(GOAWAY, 0, 0, _U32.pack(self._last_sid) + _U32.pack(code) + debug))

    # -- input ----------------------------------------------------------------------------------
    def receive(self, data: bytes) -> None:
        """Process ``data``; :class:`ProtocolError` after queueing the GOAWAY that names it."""
        if self.ended:
            return
        try:
            self._receive(data)
        except ProtocolError as exc:
            self.goaway(exc.code, str(exc).encode("ascii", "replace")[:256])
            raise
        except hpack.exceptions.HPACKError as exc:
            error = ProtocolError(ErrorCode.COMPRESSION_ERROR, f"header block: {type(exc).__name__}: {exc}")
            self.goaway(error.code, str(error).encode("ascii", "replace")[:256])
            raise error from None

    def _receive(self, data: bytes) -> None:
        buf = self._buffer
        buf += data
        pos = 0
        if not self._preface_seen:
            if len(buf) < len(PREFACE):
                if not PREFACE.startswith(bytes(buf)):
                    raise ProtocolError(ErrorCode.PROTOCOL_ERROR, "not the HTTP/2 client preface")
                return
            if buf[:len(PREFACE)] != PREFACE:
                raise ProtocolError(ErrorCode.PROTOCOL_ERROR, "not the HTTP/2 client preface")
            self._preface_seen = True
            pos = len(PREFACE)
        end = len(buf)
        try:
            while end - pos >= 9 and not self.ended:
                hi, lo, kind, flags, sid = _HEAD.unpack_from(buf, pos)
                length = hi << 16 | lo
                if length > FRAME_BYTES:
                    raise ProtocolError(ErrorCode.FRAME_SIZE_ERROR,
                                        f"frame of {length} bytes (limit {FRAME_BYTES})")
                if end - pos - 9 < length:
                    break
                payload = bytes(buf[pos + 9:pos + 9 + length])
                pos += 9 + length
                self._frame(kind, flags, sid & 0x7FFFFFFF, payload)
        finally:
            del buf[:pos]  # a frame is processed once, even when the owner's callback raised

    def _frame(self, kind: int, flags: int, sid: int, payload: bytes) -> None:
        if not self._settings_seen:
            if kind != SETTINGS or flags & FLAG_ACK:
                raise ProtocolError(ErrorCode.PROTOCOL_ERROR, "the first frame is not SETTINGS")
            self._settings_seen = True
        if self._block is not None:
            if kind != CONTINUATION or sid != self._block_sid:
                raise ProtocolError(ErrorCode.PROTOCOL_ERROR, "header block interrupted by another frame")
            self._add_block(payload)
            if flags & FLAG_END_HEADERS:
                self._headers_done()
            return
        if kind == DATA:
            self._on_data(flags, sid, payload)
        elif kind == HEADERS:
            self._on_headers(flags, sid, payload)
        elif kind == SETTINGS:
            self._on_settings(flags, sid, payload)
        elif kind == WINDOW_UPDATE:
            self._on_window_update(sid, payload)
        elif kind == PING:
            if sid:
                raise ProtocolError(ErrorCode.PROTOCOL_ERROR, "PING on a stream")
            if len(payload) != 8:
                raise ProtocolError(ErrorCode.FRAME_SIZE_ERROR, f"PING of {len(payload)} bytes")
            if not flags & FLAG_ACK:
                self._out.append(frame(PING, FLAG_ACK, 0, payload))
        elif kind == RST_STREAM:
            self._stream_frame(sid, "RST_STREAM")
            if len(payload) != 4:
                raise ProtocolError(ErrorCode.FRAME_SIZE_ERROR, f"RST_STREAM of {len(payload)} bytes")
            if self._streams.pop(sid, None) is not None:
                self.events.on_reset(sid)
        elif kind == PRIORITY:
            self._stream_frame(sid, "PRIORITY")
            if len(payload) != 5:
                raise ProtocolError(ErrorCode.FRAME_SIZE_ERROR, f"PRIORITY of {len(payload)} bytes")
            if _U32.unpack_from(payload)[0] & 0x7FFFFFFF == sid and sid in self._streams:
                self._stream_error(sid, ErrorCode.PROTOCOL_ERROR, "PRIORITY: the stream depends on itself")
        elif kind == GOAWAY:
            if sid:
                raise ProtocolError(ErrorCode.PROTOCOL_ERROR, "GOAWAY on a stream")
            if len(payload) < 8:
                raise ProtocolError(ErrorCode.FRAME_SIZE_ERROR, f"GOAWAY of {len(payload)} bytes")
            self.ended = True
            self.events.on_goaway()
        elif kind == PUSH_PROMISE:
            raise ProtocolError(ErrorCode.PROTOCOL_ERROR, "PUSH_PROMISE from a client")
        elif kind == CONTINUATION:
            raise ProtocolError(ErrorCode.PROTOCOL_ERROR, "CONTINUATION without a header block")
        # other types: ignored (RFC 9113 5.5)

    def _stream_frame(self, sid: int, what: str) -> None:
        """A frame that must be on a stream the client opened (or is opening, for PRIORITY)."""
        if not sid:
            raise ProtocolError(ErrorCode.PROTOCOL_ERROR, f"{what} on stream 0")
        if sid > self._last_sid and what != "PRIORITY":
            raise ProtocolError(ErrorCode.PROTOCOL_ERROR, f"{what} on stream {sid}, never opened")

    @staticmethod
    def _unpad(flags: int, payload: bytes, what: str) -> bytes:
        if not flags & FLAG_PADDED:
            return payload
        if not payload or payload[0] >= len(payload):
            raise ProtocolError(ErrorCode.PROTOCOL_ERROR, f"{what}: padding longer than the frame")
        return payload[1:len(payload) - payload[0]]

    def _on_data(self, flags: int, sid: int, payload: bytes) -> None:
        self._stream_frame(sid, "DATA")
        length = len(payload)  # padding counts for flow control
        stream = self._streams.get(sid)
        data = self._unpad(flags, payload, "DATA")
        self._conn_unacked += length
        if self._conn_unacked > self.window:
            raise ProtocolError(ErrorCode.FLOW_CONTROL_ERROR, "more data than the connection window")
        if self._conn_unacked >= self.window // 2:
            self._out.append(frame(WINDOW_UPDATE, 0, 0, _U32.pack(self._conn_unacked)))
            self._conn_unacked = 0
        if stream is None or not stream.receiving:
            if stream is not None:  # half-closed (remote): RFC 9113 5.1
                raise ProtocolError(ErrorCode.STREAM_CLOSED, f"DATA on stream {sid} after its END_STREAM")
            return  # closed or reset: ignored
        stream.unacked += length
        if stream.unacked > self.window:
            raise ProtocolError(ErrorCode.FLOW_CONTROL_ERROR, f"more data than stream {sid}'s window")
        ended = bool(flags & FLAG_END_STREAM)
        if not ended and stream.unacked >= self.window // 2:
            self._out.append(frame(WINDOW_UPDATE, 0, sid, _U32.pack(stream.unacked)))
            stream.unacked = 0
        if data:
            self.events.on_data(sid, data, ended)
        if ended:
            self._end_receiving(sid)

    def _end_receiving(self, sid: int) -> None:
        stream = self._streams.get(sid)
        if stream is None:  # the owner reset it while told about its data
            return
        stream.receiving = False
        if not stream.sending:
            del self._streams[sid]
        self.events.on_end(sid)

    def _on_headers(self, flags: int, sid: int, payload: bytes) -> None:
        if not sid:
            raise ProtocolError(ErrorCode.PROTOCOL_ERROR, "HEADERS on stream 0")
        payload = self._unpad(flags, payload, "HEADERS")
        self._block_problem = ""
        if flags & FLAG_PRIORITY:
            if len(payload) < 5:
                raise ProtocolError(ErrorCode.FRAME_SIZE_ERROR, "HEADERS too short for its priority")
            if _U32.unpack_from(payload)[0] & 0x7FFFFFFF == sid:
                self._block_problem = "the stream depends on itself"
            payload = payload[5:]
        stream = self._streams.get(sid)
        if stream is not None:
            if not stream.receiving:
                raise ProtocolError(ErrorCode.STREAM_CLOSED, f"HEADERS on stream {sid} after its END_STREAM")
            kind = _TRAILERS
        elif sid in self._reset_ids:
            kind = _IGNORED  # reset by us: its block is still decoded (the HPACK state), then dropped
        elif sid <= self._last_sid:
            raise ProtocolError(ErrorCode.STREAM_CLOSED if sid & 1 else ErrorCode.PROTOCOL_ERROR,
                                f"HEADERS on stream {sid}, closed or never opened (the last opened is "
                                f"{self._last_sid})")
        else:
            if not sid & 1:
                raise ProtocolError(ErrorCode.PROTOCOL_ERROR, f"stream {sid} opened by the client is even")
            if len(self._streams) >= self.max_streams:
                raise ProtocolError(ErrorCode.PROTOCOL_ERROR,
                                      f"more than {self.max_streams} concurrent streams")
            self._last_sid = sid
            kind = _REQUEST
        self._block, self._block_sid, self._block_ended = bytearray(), sid, bool(flags & FLAG_END_STREAM)
        self._block_kind = kind
        self._add_block(payload)
        if flags & FLAG_END_HEADERS:
            self._headers_done()

    def _add_block(self, payload: bytes) -> None:
        assert self._block is not None
        self._block += payload
        if len(self._block) > MAX_HEADER_BLOCK_BYTES:
            raise ProtocolError(ErrorCode.ENHANCE_YOUR_CALM,
                                  f"header block over {MAX_HEADER_BLOCK_BYTES} bytes")

    def _headers_done(self) -> None:
        block, sid, ended = self._block, self._block_sid, self._block_ended
        assert block is not None
        self._block = None
        fields = self._decoder.decode(bytes(block), raw=True)  # always: the HPACK state must follow
        kind = self._block_kind
        if kind == _IGNORED or kind == _TRAILERS and sid not in self._streams:
            return  # on a closed or reset stream (the owner may reset one while told of a block)
        trailers = kind == _TRAILERS
        headers = self._block_problem or request_headers(fields, trailers=trailers)  # type: ignore[arg-type]
        if isinstance(headers, str) or (trailers and not ended):  # malformed: a stream error
            what = "trailers" if trailers else "request headers"
            self._stream_error(sid, ErrorCode.PROTOCOL_ERROR, f"malformed {what}: "
                               f"{headers if isinstance(headers, str) else 'no END_STREAM'}")
            return
        if trailers:
            self._end_receiving(sid)
            return
        self._streams[sid] = _Stream(self._initial_send_window, receiving=not ended)
        self.events.on_request(sid, headers, ended)
        if ended:
            self._end_receiving(sid)

    def _on_settings(self, flags: int, sid: int, payload: bytes) -> None:
        if sid:
            raise ProtocolError(ErrorCode.PROTOCOL_ERROR, "SETTINGS on a stream")
        if flags & FLAG_ACK:
            if payload:
                raise ProtocolError(ErrorCode.FRAME_SIZE_ERROR, "SETTINGS ACK with a payload")
            return
        if len(payload) % 6:
            raise ProtocolError(ErrorCode.FRAME_SIZE_ERROR, f"SETTINGS of {len(payload)} bytes")
        for at in range(0, len(payload), 6):
            key, value = _SETTING.unpack_from(payload, at)
            if key == SETTINGS_ENABLE_PUSH and value > 1:
                raise ProtocolError(ErrorCode.PROTOCOL_ERROR, f"SETTINGS_ENABLE_PUSH {value}")
            if key == SETTINGS_INITIAL_WINDOW_SIZE:
                if value > MAX_WINDOW:
                    raise ProtocolError(ErrorCode.FLOW_CONTROL_ERROR, f"SETTINGS_INITIAL_WINDOW_SIZE {value}")
                delta, self._initial_send_window = value - self._initial_send_window, value
                for stream in self._streams.values():
                    if stream.sending:
                        stream.send_window += delta
                        if stream.send_window > MAX_WINDOW:
                            raise ProtocolError(ErrorCode.FLOW_CONTROL_ERROR, "a stream window overflows")
            elif key == SETTINGS_MAX_FRAME_SIZE:
                if not FRAME_BYTES <= value <= 2**24 - 1:
                    raise ProtocolError(ErrorCode.PROTOCOL_ERROR, f"SETTINGS_MAX_FRAME_SIZE {value}")
                self._max_frame = value
            # HEADER_TABLE_SIZE: our encoder's table is empty (TABLE_SIZE_ZERO); the others bind
            # what a server does not do (push, open streams) or are far above our header lists
        self._out.append(frame(SETTINGS, FLAG_ACK, 0))

    def _on_window_update(self, sid: int, payload: bytes) -> None:
        if len(payload) != 4:
            raise ProtocolError(ErrorCode.FRAME_SIZE_ERROR, f"WINDOW_UPDATE of {len(payload)} bytes")
        increment = _U32.unpack(payload)[0] & 0x7FFFFFFF
        if not sid:
            if not increment:
                raise ProtocolError(ErrorCode.PROTOCOL_ERROR, "WINDOW_UPDATE of 0 on the connection")
            self._send_window += increment
            if self._send_window > MAX_WINDOW:
                raise ProtocolError(ErrorCode.FLOW_CONTROL_ERROR, "the connection window overflows")
            return
        self._stream_frame(sid, "WINDOW_UPDATE")
        stream = self._streams.get(sid)
        if stream is None or not stream.sending:
            return  # closed, or we are done sending on it
        if not increment:
            self._stream_error(sid, ErrorCode.PROTOCOL_ERROR, "WINDOW_UPDATE of 0")
            return
        stream.send_window += increment
        if stream.send_window > MAX_WINDOW:
            self._stream_error(sid, ErrorCode.FLOW_CONTROL_ERROR, "the stream's window overflows")
