"""The sidecar's own HTTP/2 layer (:mod:`hooksidecar.h2grpc.http2`), frame by frame.

Client frames are built with ``hyperframe`` and header blocks with ``hpack`` (the libraries ``h2``
is made of), and everything the layer sends is parsed back with them: an implementation
independent of the one under test. Every malformed input must end in a connection error (GOAWAY
naming the code, nothing read afterwards) or a stream error (RST_STREAM, the connection goes on),
never in another exception; the fuzz property at the end holds that for arbitrary frames.
The server as a whole (grpcio and h2 clients over the socket) is tested in test_sidecar_h2*.py.
"""

from __future__ import annotations

import socket
import struct
from pathlib import Path
from typing import Any

import hpack
import pytest
from hyperframe import frame as hf
from hypothesis import given
from hypothesis import strategies as st

from hooksidecar.h2grpc import H2GrpcServer, frame_message, http2
from hooksidecar.h2grpc.http2 import ErrorCode, ProtocolError, ServerConnection
from tests.fuzzing import fuzz

WINDOW = 1 << 20
PREFACE = http2.server_preface(max_streams=4, window=WINDOW, max_header_list=16384)
REQUEST = [(b":method", b"POST"), (b":scheme", b"http"), (b":path", b"/t.S/Echo"), (b":authority", b"x"),
           (b"content-type", b"application/grpc"), (b"te", b"trailers")]


class Recorder:
    def __init__(self) -> None:
        self.events: list[tuple[Any, ...]] = []
        self.errors: list[tuple[int, str]] = []  # stream errors, with the reason

    def on_request(self, sid: int, headers: dict[bytes, bytes], ended: bool) -> None:
        self.events.append(("request", sid, headers, ended))

    def on_data(self, sid: int, data: bytes, ended: bool) -> None:
        self.events.append(("data", sid, data, ended))

    def on_end(self, sid: int) -> None:
        self.events.append(("end", sid))

    def on_reset(self, sid: int) -> None:
        self.events.append(("reset", sid))

    def on_goaway(self) -> None:
        self.events.append(("goaway",))

    def on_stream_error(self, sid: int, reason: str) -> None:
        self.errors.append((sid, reason))


def make() -> tuple[ServerConnection, Recorder]:
    rec = Recorder()
    conn = ServerConnection(rec, preface=PREFACE, max_streams=4, window=WINDOW, max_header_list=16384)
    return conn, rec


def ser(f: hf.Frame) -> bytes:
    return bytes(f.serialize())


def settings(**values: int) -> bytes:
    f = hf.SettingsFrame(0)
    f.settings = {getattr(hf.SettingsFrame, k): v for k, v in values.items()}
    return ser(f)


OPENING = http2.PREFACE + settings()


def headers(sid: int, fields: list[tuple[bytes, bytes]] | None = None, *, end_stream: bool = False,
            end_headers: bool = True, encoder: hpack.Encoder | None = None) -> bytes:
    f = hf.HeadersFrame(sid)
    f.data = (encoder or hpack.Encoder()).encode(REQUEST if fields is None else fields)
    if end_stream:
        f.flags.add("END_STREAM")
    if end_headers:
        f.flags.add("END_HEADERS")
    return ser(f)


def data(sid: int, payload: bytes, *, end_stream: bool = False, pad: int | None = None) -> bytes:
    f = hf.DataFrame(sid)
    f.data = payload
    if end_stream:
        f.flags.add("END_STREAM")
    if pad is not None:
        f.flags.add("PADDED")
        f.pad_length = pad
    return ser(f)


def raw(kind: int, flags: int, sid: int, payload: bytes) -> bytes:
    return struct.pack(">BHBBL", len(payload) >> 16, len(payload) & 0xFFFF, kind, flags, sid) + payload


def frames(pieces: list[bytes]) -> list[Any]:
    """What the connection sent, parsed by hyperframe."""
    blob, out, pos = b"".join(pieces), list[Any](), 0
    while pos < len(blob):
        f, length = hf.Frame.parse_frame_header(memoryview(blob[pos:pos + 9]))
        f.parse_body(memoryview(blob[pos + 9:pos + 9 + length]))
        out.append(f)
        pos += 9 + length
    return out


def goaway_code(conn: ServerConnection) -> int:
    sent = frames(conn.data_to_send())
    assert isinstance(sent[-1], hf.GoAwayFrame), sent
    return int(sent[-1].error_code)


# ------------------------------------------------------------------------------------------------
# what a gRPC unary client does
# ------------------------------------------------------------------------------------------------
def test_the_preface_is_our_settings_and_the_connection_window() -> None:
    conn, _ = make()
    sent = frames(conn.data_to_send())
    assert isinstance(sent[0], hf.SettingsFrame) and "ACK" not in sent[0].flags
    assert sent[0].settings == {hf.SettingsFrame.ENABLE_PUSH: 0, hf.SettingsFrame.MAX_CONCURRENT_STREAMS: 4,
                                hf.SettingsFrame.INITIAL_WINDOW_SIZE: WINDOW,
                                hf.SettingsFrame.MAX_HEADER_LIST_SIZE: 16384}
    assert isinstance(sent[1], hf.WindowUpdateFrame) and sent[1].window_increment == WINDOW - 65535


def test_a_unary_call_and_the_answer() -> None:
    conn, rec = make()
    conn.data_to_send()
    body = frame_message(b"hello")
    ping = hf.PingFrame(0)
    ping.opaque_data = b"12345678"
    # in pieces of 7 bytes: frames split across reads
    blob = OPENING + headers(1) + data(1, body, end_stream=True) + ser(ping)
    for at in range(0, len(blob), 7):
        conn.receive(blob[at:at + 7])
    assert rec.events == [("request", 1, dict(REQUEST), False), ("data", 1, body, True), ("end", 1)]
    sent = frames(conn.data_to_send())
    assert [type(f).__name__ for f in sent] == ["SettingsFrame", "PingFrame"]
    assert "ACK" in sent[0].flags and "ACK" in sent[1].flags and sent[1].opaque_data == b"12345678"
    conn.send_headers(1, http2.encode_headers([(b":status", b"200")]))
    conn.send_data(1, b"answer")
    conn.send_headers(1, http2.encode_headers([(b"grpc-status", b"0")]), end_stream=True)
    sent = frames(conn.data_to_send())
    decoder = hpack.Decoder()
    assert decoder.decode(sent[0].data, raw=True) == [(b":status", b"200")]
    assert sent[1].data == b"answer"
    assert decoder.decode(sent[2].data, raw=True) == [(b"grpc-status", b"0")] and "END_STREAM" in sent[2].flags
    with pytest.raises(http2.StreamClosed):
        conn.send_data(1, b"more")  # closed both ways


def test_header_blocks_we_encode_decode_the_same_and_leave_no_table_entries() -> None:
    fields = [(b"grpc-message", b"x" * 200), (b"a", b""), (b"long", b"y" * 20000)]
    block = http2.TABLE_SIZE_ZERO + http2.encode_headers(fields)
    decoder = hpack.Decoder()
    assert decoder.decode(block, raw=True) == fields
    assert len(decoder.header_table.dynamic_entries) == 0
    assert http2.encode_headers(fields) == http2.encode_headers(fields)  # no state


def test_a_large_header_block_goes_out_in_continuation_frames() -> None:
    conn, _ = make()
    conn.receive(OPENING + headers(1))
    conn.data_to_send()
    conn.send_headers(1, http2.encode_headers([(b"grpc-message", b"m" * 40000)]), end_stream=True)
    sent = frames(conn.data_to_send())
    assert [type(f).__name__ for f in sent] == ["HeadersFrame", "ContinuationFrame", "ContinuationFrame"]
    assert "END_HEADERS" in sent[-1].flags and "END_HEADERS" not in sent[0].flags
    assert hpack.Decoder().decode(b"".join(f.data for f in sent), raw=True) == [(b"grpc-message", b"m" * 40000)]


def test_sending_keeps_within_the_peers_windows_and_frame_size() -> None:
    conn, _ = make()
    conn.receive(OPENING + headers(1, end_stream=True))
    assert conn.send_window(1) == 65535 and conn.max_outbound_frame_size == 16384
    conn.receive(settings(INITIAL_WINDOW_SIZE=100, MAX_FRAME_SIZE=20000))
    assert conn.send_window(1) == 100 and conn.max_outbound_frame_size == 20000
    with pytest.raises(ValueError):
        conn.send_data(1, b"x" * 101)
    conn.send_data(1, b"x" * 100)
    assert conn.send_window(1) == 0
    update = hf.WindowUpdateFrame(1)
    update.window_increment = 50
    conn.receive(ser(update))
    assert conn.send_window(1) == 50
    conn.data_to_send()
    conn.receive(settings(INITIAL_WINDOW_SIZE=10))  # applies to open streams too
    assert conn.send_window(1) == 50 + (10 - 100)  # may go below 0 (RFC 9113 6.9.2)


def test_data_received_is_credited_back_once_half_the_window_is_used() -> None:
    conn, _ = make()
    conn.receive(OPENING + headers(1))
    conn.data_to_send()
    chunk = b"z" * 16384
    for _ in range(WINDOW // 2 // len(chunk) - 1):
        conn.receive(data(1, chunk))
    assert frames(conn.data_to_send()) == []
    conn.receive(data(1, chunk))
    sent = frames(conn.data_to_send())
    assert sorted((f.stream_id, f.window_increment) for f in sent) == [(0, WINDOW // 2), (1, WINDOW // 2)]


def test_padding_and_priority_are_taken_off() -> None:
    conn, rec = make()
    f = hf.HeadersFrame(1)
    f.data = hpack.Encoder().encode(REQUEST)
    for flag in ("END_HEADERS", "PRIORITY", "PADDED"):
        f.flags.add(flag)
    f.pad_length, f.depends_on, f.stream_weight = 3, 0, 15
    conn.receive(OPENING + ser(f) + data(1, b"abc", end_stream=True, pad=4))
    assert rec.events == [("request", 1, dict(REQUEST), False), ("data", 1, b"abc", True), ("end", 1)]


def test_trailers_end_the_request_and_client_resets_and_goaway_are_reported() -> None:
    conn, rec = make()
    enc = hpack.Encoder()
    conn.receive(OPENING + headers(1, encoder=enc) + data(1, b"x")
                 + headers(1, [(b"x-trailer", b"1")], end_stream=True, encoder=enc))
    assert rec.events[-1] == ("end", 1)
    conn.receive(headers(3, encoder=enc) + raw(http2.RST_STREAM, 0, 3, struct.pack(">L", 8)))
    assert rec.events[-1] == ("reset", 3)
    conn.receive(raw(http2.GOAWAY, 0, 0, struct.pack(">LL", 0, 0)))
    assert rec.events[-1:] == [("goaway",)] and conn.ended


def test_frames_on_a_stream_we_reset_are_ignored() -> None:
    conn, rec = make()
    enc = hpack.Encoder()
    conn.receive(OPENING + headers(1, encoder=enc))
    conn.reset(1, ErrorCode.REFUSED_STREAM)
    conn.receive(data(1, b"late") + headers(1, [(b"x", b"y")], end_stream=True, encoder=enc)
                 + headers(3, encoder=enc, end_stream=True))  # the HPACK state still followed
    assert rec.events == [("request", 1, dict(REQUEST), False), ("request", 3, dict(REQUEST), True), ("end", 3)]
    assert not conn.ended


@pytest.mark.parametrize("fields, why", [
    ([(b":method", b"POST"), (b":scheme", b"http"), (b":authority", b"x")], "no :path"),
    ([*REQUEST, (b"Content-Length", b"1")], "upper case"),
    ([*REQUEST, (b"bad name", b"1")], "not a token"),
    ([*REQUEST[:4], (b"connection", b"close")], "connection-specific"),
    ([*REQUEST[:4], (b"te", b"gzip")], "te other than trailers"),
    ([(b"x", b"1"), *REQUEST], "pseudo-header after a regular field"),
    ([*REQUEST[:3], (b":status", b"200")], "unknown pseudo-header"),
    ([*REQUEST[:3], (b":path", b"/again")], "repeated pseudo-header"),
    ([*REQUEST[:4], (b"x", b"a\nb")], "newline in a value"),
    ([*REQUEST[:4], (b"x", b" padded")], "leading space"),
])
def test_a_malformed_request_is_a_stream_error(fields: list[tuple[bytes, bytes]], why: str) -> None:
    conn, rec = make()
    enc = hpack.Encoder()
    conn.receive(OPENING + headers(1, fields, encoder=enc))
    sent = frames(conn.data_to_send())
    assert rec.events == [], why
    assert [(f.stream_id, f.error_code) for f in sent if isinstance(f, hf.RstStreamFrame)] == [
        (1, ErrorCode.PROTOCOL_ERROR)], why
    assert len(rec.errors) == 1 and rec.errors[0][0] == 1
    assert rec.errors[0][1].startswith("PROTOCOL_ERROR: malformed request headers: "), rec.errors
    conn.receive(data(1, b"ignored") + headers(3, encoder=enc, end_stream=True))  # the connection goes on
    assert rec.events == [("request", 3, dict(REQUEST), True), ("end", 3)]


def test_a_stream_that_depends_on_itself_is_a_stream_error() -> None:
    conn, rec = make()
    enc = hpack.Encoder()
    f = hf.HeadersFrame(1)
    f.data = enc.encode(REQUEST)
    f.flags.add("END_HEADERS")
    f.flags.add("PRIORITY")
    f.depends_on, f.stream_weight = 1, 15
    conn.receive(OPENING + ser(f) + headers(3, encoder=enc))  # the HPACK state followed block 1
    assert rec.events == [("request", 3, dict(REQUEST), False)]
    conn.receive(raw(http2.PRIORITY, 0, 3, struct.pack(">LB", 3, 15)))
    assert rec.events[-1] == ("reset", 3) and not conn.ended
    sent = frames(conn.data_to_send())
    assert [(f.stream_id, f.error_code) for f in sent if isinstance(f, hf.RstStreamFrame)] == [
        (1, ErrorCode.PROTOCOL_ERROR), (3, ErrorCode.PROTOCOL_ERROR)]


@pytest.mark.parametrize("increment, code", [(0, ErrorCode.PROTOCOL_ERROR),
                                             (2**31 - 65535, ErrorCode.FLOW_CONTROL_ERROR)])
def test_a_bad_window_update_on_a_stream_resets_it(increment: int, code: ErrorCode) -> None:
    conn, rec = make()
    conn.receive(OPENING + headers(1, end_stream=True))
    conn.data_to_send()
    conn.receive(_window(1, increment))
    assert rec.events[-1] == ("reset", 1) and not conn.ended
    sent = frames(conn.data_to_send())
    assert [(type(f).__name__, f.stream_id, f.error_code) for f in sent] == [("RstStreamFrame", 1, code)]
    with pytest.raises(http2.StreamClosed):
        conn.send_data(1, b"x")


def test_trailers_without_end_stream_reset_the_stream() -> None:
    conn, rec = make()
    enc = hpack.Encoder()
    conn.receive(OPENING + headers(1, encoder=enc) + headers(1, [(b"x", b"1")], encoder=enc))
    assert rec.events[-1] == ("reset", 1) and not conn.ended


# ------------------------------------------------------------------------------------------------
# connection errors
# ------------------------------------------------------------------------------------------------
def _ping(length: int = 8, sid: int = 0) -> bytes:
    return raw(http2.PING, 0, sid, b"p" * length)


def _window(sid: int, increment: int, length: int = 4) -> bytes:
    return raw(http2.WINDOW_UPDATE, 0, sid, struct.pack(">L", increment)[:length])


CONNECTION_ERRORS = [
    ("a frame larger than 16 KiB", raw(http2.DATA, 0, 1, b"x" * 16385), ErrorCode.FRAME_SIZE_ERROR),
    ("DATA on stream 0", raw(http2.DATA, 0, 0, b"x"), ErrorCode.PROTOCOL_ERROR),
    ("DATA on a stream never opened", data(5, b"x"), ErrorCode.PROTOCOL_ERROR),
    ("DATA after END_STREAM", headers(1, end_stream=True) + data(1, b"x"), ErrorCode.STREAM_CLOSED),
    ("DATA with padding longer than itself", raw(http2.DATA, http2.FLAG_PADDED, 1, b"\x05abc"),
     ErrorCode.PROTOCOL_ERROR),
    ("HEADERS on stream 0", raw(http2.HEADERS, 4, 0, b"\x82"), ErrorCode.PROTOCOL_ERROR),
    ("a client stream with an even id", headers(2), ErrorCode.PROTOCOL_ERROR),
    ("a new stream with a lower id", headers(5) + headers(3), ErrorCode.STREAM_CLOSED),
    ("HEADERS again after END_STREAM", headers(1, end_stream=True) + headers(1, end_stream=True),
     ErrorCode.STREAM_CLOSED),
    ("more streams than allowed", b"".join(headers(sid, encoder=hpack.Encoder()) for sid in (1, 3, 5, 7, 9)),
     ErrorCode.PROTOCOL_ERROR),
    ("HEADERS too short for its priority", raw(http2.HEADERS, 0x24, 1, b"\x00\x00"), ErrorCode.FRAME_SIZE_ERROR),
    ("a header block interrupted", headers(1, end_headers=False) + _ping(), ErrorCode.PROTOCOL_ERROR),
    ("CONTINUATION of another stream", headers(1, end_headers=False) + raw(http2.CONTINUATION, 4, 3, b""),
     ErrorCode.PROTOCOL_ERROR),
    ("CONTINUATION without a block", raw(http2.CONTINUATION, 4, 1, b""), ErrorCode.PROTOCOL_ERROR),
    ("a header block over 64 KiB", raw(http2.HEADERS, 0, 1, b"\x00" * 16384)
     + b"".join(raw(http2.CONTINUATION, 0, 1, b"\x00" * 16384) for _ in range(4)), ErrorCode.ENHANCE_YOUR_CALM),
    ("an HPACK index that does not exist", raw(http2.HEADERS, 4, 1, b"\xff\x50"), ErrorCode.COMPRESSION_ERROR),
    ("a header list over the limit", headers(1, [*REQUEST, (b"x", b"v" * 17000)]), ErrorCode.COMPRESSION_ERROR),
    ("PUSH_PROMISE", raw(http2.PUSH_PROMISE, 4, 1, b"\x00\x00\x00\x02"), ErrorCode.PROTOCOL_ERROR),
    ("PING of 7 bytes", _ping(7), ErrorCode.FRAME_SIZE_ERROR),
    ("PING on a stream", _ping(8, 1), ErrorCode.PROTOCOL_ERROR),
    ("SETTINGS of 5 bytes", raw(http2.SETTINGS, 0, 0, b"\x00" * 5), ErrorCode.FRAME_SIZE_ERROR),
    ("SETTINGS ACK with a payload", raw(http2.SETTINGS, 1, 0, b"\x00" * 6), ErrorCode.FRAME_SIZE_ERROR),
    ("SETTINGS on a stream", raw(http2.SETTINGS, 0, 1, b""), ErrorCode.PROTOCOL_ERROR),
    ("SETTINGS_ENABLE_PUSH 2", settings(ENABLE_PUSH=2), ErrorCode.PROTOCOL_ERROR),
    ("SETTINGS_INITIAL_WINDOW_SIZE 2^31", settings(INITIAL_WINDOW_SIZE=2**31), ErrorCode.FLOW_CONTROL_ERROR),
    ("SETTINGS_MAX_FRAME_SIZE 100", settings(MAX_FRAME_SIZE=100), ErrorCode.PROTOCOL_ERROR),
    ("WINDOW_UPDATE of 3 bytes", _window(0, 1, 3), ErrorCode.FRAME_SIZE_ERROR),
    ("WINDOW_UPDATE of 0 on the connection", _window(0, 0), ErrorCode.PROTOCOL_ERROR),
    ("the connection window overflows", _window(0, 2**31 - 1), ErrorCode.FLOW_CONTROL_ERROR),
    ("WINDOW_UPDATE on a stream never opened", _window(7, 1), ErrorCode.PROTOCOL_ERROR),
    ("RST_STREAM on stream 0", raw(http2.RST_STREAM, 0, 0, b"\x00" * 4), ErrorCode.PROTOCOL_ERROR),
    ("RST_STREAM of 3 bytes", headers(1) + raw(http2.RST_STREAM, 0, 1, b"\x00" * 3), ErrorCode.FRAME_SIZE_ERROR),
    ("RST_STREAM on a stream never opened", raw(http2.RST_STREAM, 0, 9, b"\x00" * 4), ErrorCode.PROTOCOL_ERROR),
    ("PRIORITY of 4 bytes", raw(http2.PRIORITY, 0, 1, b"\x00" * 4), ErrorCode.FRAME_SIZE_ERROR),
    ("PRIORITY on stream 0", raw(http2.PRIORITY, 0, 0, b"\x00" * 5), ErrorCode.PROTOCOL_ERROR),
    ("GOAWAY of 7 bytes", raw(http2.GOAWAY, 0, 0, b"\x00" * 7), ErrorCode.FRAME_SIZE_ERROR),
    ("GOAWAY on a stream", raw(http2.GOAWAY, 0, 1, b"\x00" * 8), ErrorCode.PROTOCOL_ERROR),
]


@pytest.mark.parametrize("why, blob, code", CONNECTION_ERRORS, ids=[c[0] for c in CONNECTION_ERRORS])
def test_a_protocol_violation_is_a_connection_error(why: str, blob: bytes, code: ErrorCode) -> None:
    conn, _ = make()
    conn.receive(OPENING)
    conn.data_to_send()
    with pytest.raises(ProtocolError) as info:
        conn.receive(blob)
    assert info.value.code == code, why
    assert goaway_code(conn) == code and conn.ended
    conn.receive(headers(11))  # nothing is read after the GOAWAY
    assert conn.data_to_send() == []


@pytest.mark.parametrize("blob", [b"GET / HTTP/1.1\r\n\r\n", b"PRI * HTTP/2.0\r\n\r\nXX\r\n\r\n", b"P" * 3 + b"x"])
def test_not_the_client_preface(blob: bytes) -> None:
    conn, _ = make()
    conn.data_to_send()
    with pytest.raises(ProtocolError):
        conn.receive(blob)
    assert goaway_code(conn) == ErrorCode.PROTOCOL_ERROR


def test_the_first_frame_must_be_settings() -> None:
    conn, _ = make()
    conn.data_to_send()
    with pytest.raises(ProtocolError):
        conn.receive(http2.PREFACE + _ping())
    assert goaway_code(conn) == ErrorCode.PROTOCOL_ERROR


def test_unknown_frame_types_are_ignored() -> None:
    conn, rec = make()
    conn.receive(OPENING + raw(0x42, 0xFF, 0, b"whatever") + headers(1, end_stream=True))
    assert rec.events[0][0] == "request" and not conn.ended


# ------------------------------------------------------------------------------------------------
# fuzz: arbitrary frames after a valid opening
# ------------------------------------------------------------------------------------------------
FRAME = st.builds(raw, st.integers(0, 11), st.integers(0, 255), st.sampled_from([0, 1, 2, 3, 5, 2**31 + 1]),
                  st.one_of(st.binary(max_size=40), st.sampled_from([hpack.Encoder().encode(REQUEST), b"\x00" * 8])))


@given(st.lists(FRAME, max_size=12), st.integers(1, 64))
@fuzz(600)
def test_arbitrary_frames_end_in_events_or_a_connection_error(blobs: list[bytes], step: int) -> None:
    conn, rec = make()
    conn.receive(OPENING)
    blob = b"".join(blobs)
    try:
        for at in range(0, len(blob), step):
            conn.receive(blob[at:at + step])
    except ProtocolError:
        assert conn.ended
    sent = frames(conn.data_to_send())  # always well-formed frames
    if conn.ended and not any(e == ("goaway",) for e in rec.events):
        assert isinstance(sent[-1], hf.GoAwayFrame)


# ------------------------------------------------------------------------------------------------
# over the socket, against the server
# ------------------------------------------------------------------------------------------------
def test_the_server_answers_a_protocol_error_with_goaway_closes_and_serves_the_next_client(
        tmp_path: Path) -> None:
    path = str(tmp_path / "e.sock")
    logged: list[tuple[str, dict[str, Any]]] = []
    server = H2GrpcServer(path, {"/t.S/Echo": lambda request: request},
                          log=lambda event, **fields: logged.append((event, fields)))
    server.start()
    try:
        for attempt in range(2):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(5)
            sock.connect(path)
            sock.sendall(OPENING + _ping(3))
            received = b""
            while chunk := sock.recv(65536):
                received += chunk
            sock.close()
            sent = frames([received])
            assert isinstance(sent[-1], hf.GoAwayFrame) and sent[-1].error_code == ErrorCode.FRAME_SIZE_ERROR
        assert [event for event, _ in logged] == ["connection-error"] * 2
        assert "FRAME_SIZE_ERROR" in logged[0][1]["error"]
    finally:
        server.stop(1)


def test_the_server_logs_a_malformed_request_and_serves_the_next_one_on_the_connection(tmp_path: Path) -> None:
    path = str(tmp_path / "m.sock")
    logged: list[tuple[str, dict[str, Any]]] = []
    server = H2GrpcServer(path, {"/t.S/Echo": lambda request: request},
                          log=lambda event, **fields: logged.append((event, fields)))
    server.start()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(5)
        sock.connect(path)
        enc = hpack.Encoder()
        sock.sendall(OPENING + headers(1, [*REQUEST[:4], (b"X-Upper", b"1")], encoder=enc)
                     + headers(3, encoder=enc) + data(3, frame_message(b"still here"), end_stream=True))
        received: list[Any] = []
        blob = b""
        while not any(isinstance(f, hf.HeadersFrame) and f.stream_id == 3 and "END_STREAM" in f.flags
                      for f in received):
            blob += sock.recv(65536)
            received = frames([blob[:_complete(blob)]])
    finally:
        sock.close()
        server.stop(1)
    assert [(f.stream_id, f.error_code) for f in received if isinstance(f, hf.RstStreamFrame)] == [
        (1, ErrorCode.PROTOCOL_ERROR)]
    assert b"".join(f.data for f in received if isinstance(f, hf.DataFrame)) == frame_message(b"still here")
    assert [(event, fields["stream"]) for event, fields in logged] == [("stream-error", 1)]
    assert "invalid field name b'X-Upper'" in logged[0][1]["error"]


def _complete(blob: bytes) -> int:
    """How many bytes of ``blob`` are whole frames."""
    pos = 0
    while pos + 9 <= len(blob) and pos + 9 + int.from_bytes(blob[pos:pos + 3], "big") <= len(blob):
        pos += 9 + int.from_bytes(blob[pos:pos + 3], "big")
    return pos
