"""How :class:`hooksidecar.h2grpc.H2GrpcServer` shares its connections among its worker threads.

Real unix sockets, ``h2`` playing the client (``RawClient`` from tests/test_sidecar_h2.py), the server
in this process with a small table of handlers written here (they record the thread that ran them,
or wait until the test lets them go): what is checked is the transport, not the hook API.

- Calls made one after the other are all served by one thread, also when each client is still
  connected when the next one comes (gRPC clients close a moment after their answer): the idle
  connection is watched by the leader, not handed to another thread.
- A client that comes while the leader is in the middle of a call is served by another worker.
- At most ``max_connections`` connections are open; a further client waits in the backlog and is
  served as soon as one closes.
- The workers are started with the server, none per connection, and all of them end at stop.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import h2.events
import h2.settings
import pytest

from hooksidecar import h2grpc
from hooksidecar.h2grpc import H2GrpcServer, limits
from tests.test_sidecar_h2 import RawClient


class Recorder:
    """Handlers that note the thread they ran in; ``/t.S/Hold`` waits until ``release`` is set."""

    def __init__(self) -> None:
        self.threads: list[str] = []
        self.entered = threading.Event()
        self.release = threading.Event()

    def echo(self, request: bytes) -> bytes:
        self.threads.append(threading.current_thread().name)
        return request

    def hold(self, request: bytes) -> bytes:
        self.entered.set()
        assert self.release.wait(10)
        return request


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[H2GrpcServer, str, Recorder]]:
    rec = Recorder()
    path = str(tmp_path / "w.sock")
    server = H2GrpcServer(path, {"/t.S/Echo": rec.echo, "/t.S/Hold": rec.hold}, max_message_bytes=1 << 20,
                          max_connections=3)
    server.start()
    yield server, path, rec
    rec.release.set()
    server.stop(1)


def call(client: RawClient, body: bytes, path: bytes = b"/t.S/Echo") -> bytes:
    blocks, data = client.answer(client.request(path, h2grpc.frame_message(body)))
    assert blocks[-1][b"grpc-status"] == b"0", blocks
    return data[h2grpc.PREFIX_BYTES:]


def workers() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("h2grpc-")]


def test_sequential_calls_with_lingering_clients_are_served_by_one_thread(
        served: tuple[H2GrpcServer, str, Recorder]) -> None:
    _, path, rec = served
    open_clients: list[RawClient] = []
    try:
        for n in range(12):
            client = RawClient(path)
            assert call(client, b"call %d" % n) == b"call %d" % n
            open_clients.append(client)  # still connected when the next client comes
            if len(open_clients) > 2:
                open_clients.pop(0).close()
    finally:
        for client in open_clients:
            client.close()
    assert len(rec.threads) == 12
    assert len(set(rec.threads)) == 1, rec.threads


def test_a_client_that_comes_during_a_call_is_served_by_another_worker(
        served: tuple[H2GrpcServer, str, Recorder]) -> None:
    _, path, rec = served
    first = RawClient(path)
    second = None
    try:
        sid = first.request(b"/t.S/Hold", h2grpc.frame_message(b"held"))
        assert rec.entered.wait(5)  # the leader is inside the handler
        second = RawClient(path)
        assert call(second, b"meanwhile") == b"meanwhile"  # the standby took it
        rec.release.set()
        _, data = first.answer(sid)
        assert data.endswith(b"held")
        assert call(first, b"again") == b"again"
    finally:
        first.close()
        if second is not None:
            second.close()
    assert len(rec.threads) == 2 and rec.threads[0] != rec.threads[1], rec.threads


def test_at_most_max_connections_are_open_the_next_client_waits(
        served: tuple[H2GrpcServer, str, Recorder]) -> None:
    _, path, _ = served
    held = [RawClient(path) for _ in range(3)]  # max_connections=3
    waiting = None
    try:
        for client in held:
            assert call(client, b"hello") == b"hello"
        waiting = RawClient(path)  # the kernel queues it in the backlog
        sid = waiting.request(b"/t.S/Echo", h2grpc.frame_message(b"late"))
        waiting.sock.settimeout(0.5)
        with pytest.raises(TimeoutError):
            waiting.sock.recv(1)  # not even the server preface: nobody took it
        waiting.sock.settimeout(5)
        held.pop(0).close()  # one slot frees up
        _, data = waiting.answer(sid)
        assert data.endswith(b"late")
    finally:
        for client in held:
            client.close()
        if waiting is not None:
            waiting.close()


def test_no_thread_per_connection_and_every_worker_ends_at_stop(tmp_path: Path) -> None:
    before = len(workers())
    rec = Recorder()
    server = H2GrpcServer(str(tmp_path / "s.sock"), {"/t.S/Echo": rec.echo}, max_connections=4)
    server.start()
    try:
        assert len(workers()) == before + 4
        for n in range(20):
            client = RawClient(str(tmp_path / "s.sock"))
            try:
                call(client, b"%d" % n)
            finally:
                client.close()
        assert len(workers()) == before + 4
        idle = RawClient(str(tmp_path / "s.sock"))
        call(idle, b"idle")
    finally:
        began = time.monotonic()
        server.stop(5)
    assert time.monotonic() - began < 2  # the idle connection did not hold the stop
    idle.pump(lambda evs: any(isinstance(e, h2.events.ConnectionTerminated) for e in evs))
    idle.close()
    assert len(workers()) == before


def test_a_client_that_does_not_read_its_answer_holds_nobody_else(
        served: tuple[H2GrpcServer, str, Recorder], monkeypatch: pytest.MonkeyPatch) -> None:
    """The leader blocked sending an answer the client does not read (its windows let the server
    send it all, more than the socket buffers hold): a client that comes meanwhile is served by the
    standby, and the stuck connection is dropped after the send timeout."""
    monkeypatch.setattr(limits, "SEND_TIMEOUT_SECONDS", 3.0)
    server, path, _ = served
    reports: list[dict[str, object]] = []
    monkeypatch.setattr(server, "report", lambda event, **fields: reports.append({"event": event, **fields}))
    stuck = RawClient(path)
    other = None
    try:
        stuck.pump(lambda evs: any(isinstance(e, h2.events.RemoteSettingsChanged) for e in evs))
        stuck.h2.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 2**31 - 1})
        stuck.h2.increment_flow_control_window(2**31 - 1 - 65535)
        sid = stuck.h2.get_next_available_stream_id()
        stuck.h2.send_headers(sid, [(b":method", b"POST"), (b":scheme", b"http"), (b":path", b"/t.S/Echo"),
                                    (b":authority", b"x"), (b"content-type", b"application/grpc")])
        body = h2grpc.frame_message(b"y" * (900 * 1024))
        for at in range(0, len(body), 16384):
            stuck.h2.send_data(sid, body[at:at + 16384], end_stream=at + 16384 >= len(body))
        stuck.flush()  # and then never read the answer
        time.sleep(0.3)  # the leader is blocked in its send by now
        other = RawClient(path)
        began = time.monotonic()
        assert call(other, b"meanwhile") == b"meanwhile"
        assert time.monotonic() - began < 1.5  # not after the stuck send gave up
        deadline = time.monotonic() + 8
        while not any("read nothing" in str(r.get("error")) for r in reports):
            assert time.monotonic() < deadline, reports
            time.sleep(0.05)
    finally:
        stuck.close()
        if other is not None:
            other.close()
