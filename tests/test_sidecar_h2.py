"""The h2 transport (:mod:`hooksidecar.h2grpc`) against independent HTTP/2 implementations.

Interop: grpcio's client (gRPC's C core, its own HTTP/2 stack) with default options calls the real
sidecar (``python -m hooksidecar.cli serve``, its own HTTP/2 layer, transport ``h2``, is the default)
as virt-launcher does, on
several sequential connections and from four threads at once, and with a ~1 MiB domain XML that only
gets through if both sides honour HTTP/2 flow control. ``tests/test_sidecar_server.py`` runs its whole
suite against the same default transport.

Wire details (compressed flag, wrong content type, PING, GOAWAY on stop, percent-encoded messages)
are checked with the ``h2`` package playing the client over a real unix socket against :class:`H2GrpcServer` in
this process. Those tests serve a small table of handlers written here (an echo and a failing one),
the stand-in for the hook API, because what they check is the wire, not the hook.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import h2.config
import h2.connection
import h2.events
import h2.exceptions
import pytest

from hooksidecar import h2grpc
from hooksidecar import server as srv
from hooksidecar._pb import v1alpha3_pb2
from hooksidecar.h2grpc import H2GrpcServer, RpcStatus, StatusCode
from hooksidecar.h2grpc.connection import Outgoing
from tests.conftest import ROOT
from tests.test_sidecar_server import (
    PLAN_TEXT,
    PlannedSample,
    Sidecar,
    build_sample,
    call_info,
    call_on_define,
    disk_by_alias,
    rpc,
    rpc_error,
    start_sidecar,
    subprocess_env,
    wait_ready,
)

MiB = 1024 * 1024


@pytest.fixture(scope="module")
def sample(tmp_path_factory: pytest.TempPathFactory) -> PlannedSample:
    return build_sample(tmp_path_factory.mktemp("prefix"))


def call_shutdown(target: str) -> Any:
    with grpc.insecure_channel(target) as channel:
        return rpc(channel, v1alpha3_pb2, "Callbacks", "Shutdown")(v1alpha3_pb2.ShutdownParams(), timeout=5)


def big_domain(xml: bytes, size: int) -> bytes:
    """``xml`` grown to about ``size`` bytes by a long ``<description>`` (still one valid domain)."""
    pad = b"<description>" + b"x" * size + b"</description>"
    at = xml.index(b">", xml.index(b"<domain")) + 1
    return xml[:at] + pad + xml[at:]


# ================================================================================================
# grpcio's client against the real sidecar
# ================================================================================================
def test_sidecar_serves_with_h2_by_default(sock_dir: Path) -> None:
    sidecar = start_sidecar(sock_dir)
    try:
        serving = [r for r in sidecar.log() if r["event"] == "serving"]
        assert serving and serving[0]["transport"] == "h2"
    finally:
        sidecar.stop()


def test_sequential_connections_info_on_define_then_shutdown(sock_dir: Path, sample: PlannedSample) -> None:
    """Three VM starts in a row, each call on its own connection, then Shutdown."""
    sidecar = start_sidecar(sock_dir, "--path-prefix", str(sample.prefix))
    try:
        answers = []
        for _ in range(3):
            assert call_info(sidecar.target).name == "diskhooks"
            answers.append(call_on_define(sidecar.target, "v1alpha3", sample.first_call, sample.vmi))
            answers.append(call_on_define(sidecar.target, "v1alpha2", sample.later_call, sample.vmi))
        assert b'type="qcow2"' in disk_by_alias(answers[0], "ua-datadisk")
        assert len(set(answers[0::2])) == 1 and len(set(answers[1::2])) == 1
        assert call_shutdown(sidecar.target) == v1alpha3_pb2.ShutdownResult()
        assert sidecar.proc.wait(timeout=10) == 0
    finally:
        sidecar.stop()
    assert not sidecar.socket_path.exists()
    calls = [r for r in sidecar.log() if r["event"] == "call"]
    assert [r["hook"] for r in calls].count("OnDefineDomain") == 6
    assert not [r for r in sidecar.log() if r["event"] == "connection-error"]


def test_four_threads_at_once(sock_dir: Path, sample: PlannedSample) -> None:
    """Four callers, each dialling its own connections, plus one channel shared by all four
    (several streams multiplexed on one connection): every answer is right."""
    sidecar = start_sidecar(sock_dir, "--path-prefix", str(sample.prefix))
    expected = call_on_define(sidecar.target, "v1alpha3", sample.first_call, sample.vmi)
    errors: list[BaseException] = []
    shared = grpc.insecure_channel(sidecar.target)
    shared_call = rpc(shared, v1alpha3_pb2, "Callbacks", "OnDefineDomain")

    def worker() -> None:
        try:
            for _ in range(5):
                assert call_info(sidecar.target).name == "diskhooks"
                assert call_on_define(sidecar.target, "v1alpha3", sample.first_call, sample.vmi) == expected
                result = shared_call(v1alpha3_pb2.OnDefineDomainParams(domainXML=sample.first_call,
                                                                       vmi=sample.vmi), timeout=60)
                assert result.domainXML == expected
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(exc)

    try:
        threads = [threading.Thread(target=worker) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not errors, errors
        assert call_shutdown(sidecar.target) == v1alpha3_pb2.ShutdownResult()
        assert sidecar.proc.wait(timeout=10) == 0
    finally:
        shared.close()
        sidecar.stop()
    ok = [r for r in sidecar.log() if r["event"] == "call" and r["hook"] == "OnDefineDomain"]
    assert len(ok) == 1 + 4 * 5 * 2 and all(r["result"] == "ok" for r in ok)


def test_largest_message_both_ways(sock_dir: Path, sample: PlannedSample) -> None:
    """Just under the sidecar's message bound up and back (a VMI without a plan, in a Pod the webhook
    gave none, gets its domain back unchanged, never parsed): far beyond the 64 KiB default windows,
    so each side must wait for the other's WINDOW_UPDATEs. With the plan, the core's own 512 KiB
    domain bound refuses the same request after it arrived whole, naming the limit."""
    huge = big_domain(sample.first_call, srv.MAX_MESSAGE_BYTES - len(sample.vmi) - len(sample.first_call) - 64)
    assert 1 * MiB - 16 * 1024 < len(huge) < srv.MAX_MESSAGE_BYTES - len(sample.vmi) - 16
    unplanned = start_sidecar(sock_dir, "--path-prefix", str(sample.prefix), plan=None, name="unplanned")
    try:
        assert call_on_define(unplanned.target, "v1alpha3", huge, sample.vmi_without_plan) == huge
    finally:
        unplanned.stop()
    sidecar = start_sidecar(sock_dir, "--path-prefix", str(sample.prefix))
    try:
        err = rpc_error(call_on_define, sidecar.target, "v1alpha3", huge, sample.vmi)
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "domainXML" in err.details() and "512 KiB" in err.details(), err.details()
        assert call_info(sidecar.target).name == "diskhooks"
    finally:
        sidecar.stop()


def test_grpcio_transport_is_still_available(sock_dir: Path, sample: PlannedSample) -> None:
    sidecar = start_sidecar(sock_dir, "--transport", "grpcio", "--path-prefix", str(sample.prefix))
    try:
        assert [r["transport"] for r in sidecar.log() if r["event"] == "serving"] == ["grpcio"]
        out = call_on_define(sidecar.target, "v1alpha1", sample.first_call, sample.vmi)
        assert b'type="qcow2"' in disk_by_alias(out, "ua-datadisk")
        err = rpc_error(call_on_define, sidecar.target, "v1alpha3", b"<nope", sample.vmi)
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    finally:
        sidecar.stop()
    assert not sidecar.socket_path.exists()


# ================================================================================================
# the wire, with h2 as the client, against the server in this process
# ================================================================================================
def _echo(request: bytes) -> bytes:
    return request


def _refuse(request: bytes) -> bytes:
    raise RpcStatus(StatusCode.FAILED_PRECONDITION, request.decode())


def _crash(request: bytes) -> bytes:
    raise KeyError("boom")


@pytest.fixture
def wire_server(tmp_path: Path) -> Iterator[tuple[H2GrpcServer, str]]:
    path = str(tmp_path / "w.sock")
    server = H2GrpcServer(path, {"/t.S/Echo": _echo, "/t.S/Refuse": _refuse, "/t.S/Crash": _crash},
                          max_message_bytes=1 * MiB)
    server.start()
    yield server, path
    server.stop(1)


class RawClient:
    """An HTTP/2 client made with h2 (client side) on a plain unix socket."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(5)
        self.sock.connect(path)
        self.h2 = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
        self.h2.initiate_connection()
        self.flush()
        self.events: list[h2.events.Event] = []

    def flush(self) -> None:
        self.sock.sendall(self.h2.data_to_send())

    def request(self, path: bytes, body: bytes, *, content_type: bytes = b"application/grpc") -> int:
        sid = self.h2.get_next_available_stream_id()
        self.h2.send_headers(sid, [(b":method", b"POST"), (b":scheme", b"http"), (b":path", path),
                                   (b":authority", b"localhost"), (b"content-type", content_type),
                                   (b"te", b"trailers")])
        self.h2.send_data(sid, body, end_stream=True)
        self.flush()
        return sid

    def pump(self, until: Any, timeout: float = 5) -> None:
        """Read until ``until(events)`` is true."""
        deadline = time.monotonic() + timeout
        while not until(self.events):
            assert time.monotonic() < deadline, self.events
            data = self.sock.recv(65536)
            if not data:
                return
            for event in self.h2.receive_data(data):
                if isinstance(event, h2.events.DataReceived) and event.stream_id:
                    self.h2.acknowledge_received_data(event.flow_controlled_length or 0, event.stream_id)
                self.events.append(event)
            try:
                self.flush()
            except BrokenPipeError:  # the server closed after its GOAWAY
                return

    def answer(self, sid: int) -> tuple[list[dict[bytes, bytes]], bytes]:
        self.pump(lambda evs: any(isinstance(e, (h2.events.StreamEnded, h2.events.StreamReset))
                                  and e.stream_id == sid for e in evs))
        blocks = [dict(e.headers) for e in self.events
                  if isinstance(e, (h2.events.ResponseReceived, h2.events.TrailersReceived)) and e.stream_id == sid]
        body = b"".join(e.data for e in self.events if isinstance(e, h2.events.DataReceived) and e.stream_id == sid)
        return blocks, body

    def close(self) -> None:
        self.sock.close()


def test_unary_call_headers_message_trailers(wire_server: tuple[H2GrpcServer, str]) -> None:
    client = RawClient(wire_server[1])
    try:
        sid = client.request(b"/t.S/Echo", h2grpc.frame_message(b"hello"))
        blocks, body = client.answer(sid)
    finally:
        client.close()
    assert blocks[0][b":status"] == b"200" and blocks[0][b"content-type"] == b"application/grpc"
    assert body == b"\x00\x00\x00\x00\x05hello"
    assert blocks[1] == {b"grpc-status": b"0"}


@pytest.mark.parametrize("path, body, code", [
    (b"/t.S/Nope", h2grpc.frame_message(b""), StatusCode.UNIMPLEMENTED),
    (b"/t.S/Echo", b"\x01\x00\x00\x00\x01x", StatusCode.UNIMPLEMENTED),  # compressed flag
    (b"/t.S/Echo", b"\x07\x00\x00\x00\x01x", StatusCode.INTERNAL),  # invalid flag
    (b"/t.S/Echo", b"\x00\x00\x00", StatusCode.INTERNAL),  # truncated prefix
    (b"/t.S/Echo", h2grpc.frame_message(b"a") + h2grpc.frame_message(b"b"), StatusCode.INTERNAL),
    (b"/t.S/Echo", b"\x00" + (2 * MiB).to_bytes(4, "big"), StatusCode.RESOURCE_EXHAUSTED),
    (b"/t.S/Crash", h2grpc.frame_message(b""), StatusCode.INTERNAL),
])
def test_errors_are_trailers_only(wire_server: tuple[H2GrpcServer, str], path: bytes, body: bytes,
                                  code: StatusCode) -> None:
    client = RawClient(wire_server[1])
    try:
        sid = client.request(path, body)
        blocks, data = client.answer(sid)
        assert data == b"" and len(blocks) == 1
        assert blocks[0][b":status"] == b"200" and blocks[0][b"grpc-status"] == str(int(code)).encode()
        assert blocks[0][b"grpc-message"]
        # the connection still serves
        blocks, data = client.answer(client.request(b"/t.S/Echo", h2grpc.frame_message(b"again")))
        assert data.endswith(b"again")
    finally:
        client.close()


def test_a_connection_buffers_a_bounded_amount(wire_server: tuple[H2GrpcServer, str]) -> None:
    """Three unfinished 0.9 MiB uploads on one connection (bound 1 MiB per message): the one that
    takes the connection past message bound + 1 MiB is refused; the others still complete."""
    client = RawClient(wire_server[1])
    try:
        client.pump(lambda evs: any(isinstance(e, h2.events.RemoteSettingsChanged) for e in evs))
        part = 900 * 1024
        sids = []
        for _ in range(3):
            sid = client.h2.get_next_available_stream_id()
            client.h2.send_headers(sid, [(b":method", b"POST"), (b":scheme", b"http"), (b":path", b"/t.S/Echo"),
                                         (b":authority", b"x"), (b"content-type", b"application/grpc")])
            body = b"\x00" + (part).to_bytes(4, "big") + b"y" * (part - 5)  # 5 bytes short of complete
            sent = 0
            while sent < len(body):
                room = min(client.h2.local_flow_control_window(sid), client.h2.max_outbound_frame_size,
                           len(body) - sent)
                if room <= 0:
                    client.pump(lambda evs, s=sid: client.h2.local_flow_control_window(s) > 0)
                    continue
                try:
                    client.h2.send_data(sid, body[sent:sent + room])
                except h2.exceptions.StreamClosedError:
                    break  # refused while uploading
                sent += room
                client.flush()
            sids.append(sid)
        blocks, _ = client.answer(sids[2])
        assert blocks[0][b"grpc-status"] == str(int(StatusCode.RESOURCE_EXHAUSTED)).encode()
        client.h2.send_data(sids[0], b"z" * 5, end_stream=True)
        client.flush()
        _, data = client.answer(sids[0])
        assert len(data) == 5 + part
    finally:
        client.close()


def test_wrong_content_type_is_http_415(wire_server: tuple[H2GrpcServer, str]) -> None:
    client = RawClient(wire_server[1])
    try:
        blocks, _ = client.answer(client.request(b"/t.S/Echo", b"{}", content_type=b"application/json"))
    finally:
        client.close()
    assert blocks[0][b":status"] == b"415"


def test_ping_is_answered(wire_server: tuple[H2GrpcServer, str]) -> None:
    client = RawClient(wire_server[1])
    try:
        client.h2.ping(b"12345678")
        client.flush()
        client.pump(lambda evs: any(isinstance(e, h2.events.PingAckReceived) for e in evs))
        acks = [e for e in client.events if isinstance(e, h2.events.PingAckReceived)]
    finally:
        client.close()
    assert acks[0].ping_data == b"12345678"


def test_stop_sends_goaway_to_idle_connections_without_waiting(tmp_path: Path) -> None:
    path = str(tmp_path / "g.sock")
    server = H2GrpcServer(path, {"/t.S/Echo": _echo})
    server.start()
    client = RawClient(path)
    try:
        client.answer(client.request(b"/t.S/Echo", h2grpc.frame_message(b"x")))
        began = time.monotonic()
        server.stop(5)
        assert time.monotonic() - began < 2  # nothing in flight: no need for the grace period
        client.pump(lambda evs: any(isinstance(e, h2.events.ConnectionTerminated) for e in evs))
        assert any(isinstance(e, h2.events.ConnectionTerminated) for e in client.events)
        with pytest.raises(OSError):
            RawClient(path)  # no longer accepting
    finally:
        client.close()


def test_status_message_is_percent_encoded_and_grpcio_decodes_it(wire_server: tuple[H2GrpcServer, str]) -> None:
    message = "disk “datadisk”: 100% full\nsecond line"
    with grpc.insecure_channel(f"unix://{wire_server[1]}") as channel:
        err = rpc_error(channel.unary_unary("/t.S/Refuse"), message.encode(), 5)
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert err.details() == message
    assert h2grpc.percent_encode(message).isascii() and "%25" in h2grpc.percent_encode(message)


def test_large_echo_over_grpcio_honours_flow_control(wire_server: tuple[H2GrpcServer, str]) -> None:
    payload = bytes(range(256)) * 4000  # ~1 MiB, under the server's 1 MiB bound here
    payload = payload[: MiB - 16]
    with grpc.insecure_channel(f"unix://{wire_server[1]}") as channel:
        assert channel.unary_unary("/t.S/Echo")(payload, timeout=10) == payload


# ================================================================================================
# pure pieces
# ================================================================================================
def test_content_types() -> None:
    for ok in (b"application/grpc", b"application/grpc+proto", b"application/grpc; charset=x",
               b"Application/GRPC"):
        assert h2grpc.is_grpc_content_type(ok)
    for bad in (b"", b"application/json", b"application/grpcx", b"text/plain"):
        assert not h2grpc.is_grpc_content_type(bad)


def test_unframe_request() -> None:
    assert h2grpc.unframe_request(h2grpc.frame_message(b"abc"), limit=3) == b"abc"
    assert h2grpc.unframe_request(h2grpc.frame_message(b""), limit=0) == b""
    with pytest.raises(RpcStatus) as info:
        h2grpc.unframe_request(h2grpc.frame_message(b"abcd"), limit=3)
    assert info.value.code == StatusCode.RESOURCE_EXHAUSTED
    with pytest.raises(RpcStatus) as info:
        h2grpc.unframe_request(h2grpc.frame_message(b"abcd")[:-1], limit=10)
    assert info.value.code == StatusCode.INTERNAL and "truncated" in info.value.message


def test_percent_encode() -> None:
    assert h2grpc.percent_encode("plain text: ok") == "plain text: ok"
    assert h2grpc.percent_encode("a%b\n") == "a%25b%0A"
    assert h2grpc.percent_encode("é") == "%C3%A9"


def test_outgoing_chunks_rebuild_the_framed_message() -> None:
    """The answer is sent without copying it behind its prefix: any chunking gives the same bytes."""
    for size in (1, 2, 4, 5, 6, 7, 1000):
        out = Outgoing(b"abcdefghij", 0, b"")
        pieces = []
        while out.offset < out.total:
            piece = out.chunk(size)
            assert 0 < len(piece) <= size
            pieces.append(piece)
            out.offset += len(piece)
        assert b"".join(pieces) == h2grpc.frame_message(b"abcdefghij")


# ================================================================================================
# serving without grpcio or h2 (the sidecar image ships neither)
# ================================================================================================
NO_GRPC = ("import sys; sys.modules['grpc'] = sys.modules['h2'] = sys.modules['hyperframe'] = None; "
           # any `import grpc` (or h2, hyperframe) now fails
           "from hooksidecar.cli import main; raise SystemExit(main(sys.argv[1:]))")


def _run_without_grpc(sock_dir: Path, *args: str) -> Sidecar:
    log_path = sock_dir.parent / f"nogrpc-{time.monotonic_ns()}.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-c", NO_GRPC, "serve", "--socket-dir", str(sock_dir), *args],
                                cwd=ROOT, env={**subprocess_env(), "DISKHOOKS_PLAN": PLAN_TEXT},
                                stdout=subprocess.DEVNULL, stderr=log)
    return Sidecar(proc, sock_dir / "diskhooks.sock", log_path)


def test_serves_without_grpcio_or_h2_installed(sock_dir: Path, sample: PlannedSample) -> None:
    sidecar = _run_without_grpc(sock_dir, "--path-prefix", str(sample.prefix))
    try:
        wait_ready(sidecar)
        out = call_on_define(sidecar.target, "v1alpha3", sample.first_call, sample.vmi)
        assert b'type="qcow2"' in disk_by_alias(out, "ua-datadisk")
    finally:
        sidecar.stop()
    assert sidecar.proc.returncode == 0


def test_grpcio_transport_without_grpcio_says_so(sock_dir: Path) -> None:
    sidecar = _run_without_grpc(sock_dir, "--transport", "grpcio")
    assert sidecar.proc.wait(timeout=15) == 1
    errors = [r for r in sidecar.log() if r["event"] == "error"]
    assert errors and "grpcio" in errors[0]["error"] and "not installed" in errors[0]["error"]
    assert not sidecar.socket_path.exists()
