"""Cold migration, the parts that need no API server: the status and wire formats, rsync's allowed
command line (checked against what the real rsync asks its remote shell to run), the webhook's rules,
the TLS bridge over real sockets, the command's helpers."""

from __future__ import annotations

import copy
import json
import os
import socket
import ssl
import stat
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from diskplan import keys as K
from diskplan.errors import Malformed, Refused
from diskplan.migration import (
    ANN_MIGRATE_DELETE_SOURCE,
    ANN_MIGRATE_TO,
    ANN_MIGRATION_STATUS,
    DEST_PLACEHOLDER,
    RSYNC_CLIENT_OPTIONS,
    RSYNC_COMPRESS_OPTIONS,
    Base,
    FileEntry,
    MigrationStatus,
    WireRequest,
    check_server_args,
    is_movable_name,
    parse_request,
    parse_status,
    request_json,
    status_json,
    stop_problem,
    wants_compression,
)
from diskplan.policy import load_policy
from nodeagent.migrate.bridge import (
    COMPACT_AT,
    OUT_BUFFER,
    RECORD,
    BridgeError,
    OutBuffer,
    TlsChannel,
    pipe_backoff,
    pump,
    widen_pipe,
)
from nodeagent.migrate.command import eta, human, progress_line
from nodeagent.migrate.options import duration
from nodeagent.migrate.tlsfiles import PEER_NAME, TlsFiles
from tests.migration_support import make_tls
from webhook.cluster import FileCluster
from webhook.vm.migration import check_migration

AGENT = "system:serviceaccount:diskhooks-system:diskhooks-node"
POLICY = load_policy("""hostDisks:
  root: /var/lib/diskhooks/vms
sidecar:
  image: ghcr.io/diskhooks/diskhooks-sidecar:0.1.0
nodeAgent:
  serviceAccount: diskhooks-system/diskhooks-node
""")
STATUS = MigrationStatus(id="0123456789abcdef", phase="Copying", source="node-a", target="node-b",
                         bytes=10, total=100, rate=5, started_at="2026-01-02T03:04:05Z",
                         updated_at="2026-01-02T03:04:07Z")


# ------------------------------------------------------------------------------------------------
# formats
# ------------------------------------------------------------------------------------------------
def test_the_status_reads_back_and_is_strict() -> None:
    assert parse_status(status_json(STATUS)) == STATUS
    long = STATUS.advanced(phase="Failed", error="x" * 5000)
    assert len(parse_status(status_json(long)).error or "") == 600  # cut, not refused
    for doc, field in [({**json.loads(status_json(STATUS)), "extra": 1}, "extra"),
                       ({**json.loads(status_json(STATUS)), "phase": "Running"}, "phase"),
                       ({**json.loads(status_json(STATUS)), "id": "XYZ"}, "id"),
                       ({**json.loads(status_json(STATUS)), "bytes": -1}, "bytes"),
                       ({**json.loads(status_json(STATUS)), "target": "Node_B"}, "target"),
                       ({**json.loads(status_json(STATUS)), "sourceKept": "relative/path"}, "sourceKept")]:
        with pytest.raises(Malformed) as err:
            parse_status(json.dumps(doc))
        assert err.value.field == f"{ANN_MIGRATION_STATUS}.{field}"
    with pytest.raises(Malformed):
        parse_status("{" * 5000)


def request(**changes: Any) -> WireRequest:
    base = WireRequest(op="commit", id="0123456789abcdef", namespace="vms", vm="pg01", vm_uid="uid-1",
                       source="node-a", target="node-b",
                       files=(FileEntry("data.qcow2", 10, 4096, "ab" * 32),),
                       bases=(Base("base-a.qcow2", "cd" * 32),))
    return WireRequest(**{**base.__dict__, **changes})


def test_a_wire_request_reads_back_and_names_what_is_wrong() -> None:
    r = request()
    assert parse_request(request_json(r).rstrip(b"\n")) == r
    doc = json.loads(request_json(r))
    for member, value, field in [("op", "shell", "request.op"), ("namespace", "../x", "request.namespace"),
                                 ("files", [{"name": "../etc", "size": 1, "allocated": 1}],
                                  "request.files[0].name"),
                                 ("files", [{"name": ".hidden", "size": 1, "allocated": 1}],
                                  "request.files[0].name"),
                                 ("bases", [{"file": "a/b", "sha256": "cd" * 32}], "request.bases[0].file"),
                                 ("args", ["x" * 300], "request.args")]:
        with pytest.raises(Malformed) as err:
            parse_request(json.dumps({**doc, member: value}).encode())
        assert err.value.field == field
    twice = [{"name": "a.qcow2", "size": 1, "allocated": 1}] * 2
    with pytest.raises(Malformed, match="twice"):
        parse_request(json.dumps({**doc, "files": twice}).encode())


def test_movable_names() -> None:
    assert all(is_movable_name(n) for n in ("data.qcow2", K.HOME_MARKER, "persist-root.root.base.json"))
    assert not any(is_movable_name(n) for n in (".data.qcow2.tmp-1", "..", "a/b", "", "x" * 300, "a b"))


@pytest.mark.parametrize("spec, problem", [
    ({"runStrategy": "Halted"}, None), ({"runStrategy": "Manual"}, None), ({"running": False}, None),
    ({"runStrategy": "Always"}, "Always"), ({"runStrategy": "RerunOnFailure"}, "RerunOnFailure"),
    ({"runStrategy": "Once"}, "Once"), ({"running": True}, "running is true"),
])
def test_which_vms_stay_stopped(spec: dict[str, Any], problem: str | None) -> None:
    found = stop_problem(spec)
    assert (found is None) if problem is None else (found is not None and problem in found)


# ------------------------------------------------------------------------------------------------
# rsync's command line: what the real rsync asks for is exactly what the target accepts
# ------------------------------------------------------------------------------------------------
def server_args_of(tmp_path: Path, *extra: str) -> list[str]:
    """What the real rsync, run with the source's options, asks its remote shell to run."""
    shell = tmp_path / "shell.sh"
    dump = tmp_path / "args.txt"
    shell.write_text(f"#!/bin/sh\nprintf '%s\\n' \"$@\" > {dump}\nexit 1\n")
    shell.chmod(0o755)
    src = tmp_path / "src"
    src.mkdir(exist_ok=True)
    subprocess.run(["rsync", *RSYNC_CLIENT_OPTIONS, *extra, "-e", str(shell), f"{src}/",
                    f"target:{DEST_PLACEHOLDER}"], capture_output=True, check=False)
    return dump.read_text().splitlines()[1:]  # without the host


def test_the_target_accepts_the_source_rsyncs_command_line(tmp_path: Path) -> None:
    for extra in ((), ("--bwlimit=12288",), RSYNC_COMPRESS_OPTIONS, ("--bwlimit=1", *RSYNC_COMPRESS_OPTIONS)):
        args = server_args_of(tmp_path, *extra)
        assert check_server_args(args, "/staging/vms/pg01") == [*args[:-1], "/staging/vms/pg01/"]


def test_only_a_mostly_sparse_directory_is_compressed() -> None:
    dense = [FileEntry("data.qcow2", 1 << 30, 1 << 30), FileEntry(K.HOME_MARKER, 200, 4096)]
    holes = [FileEntry("data.qcow2", 1 << 30, 1 << 28), FileEntry(K.HOME_MARKER, 200, 4096)]
    assert not wants_compression(dense) and wants_compression(holes) and not wants_compression([])


@pytest.mark.parametrize("change", [
    lambda a: a.insert(2, "--sender"),  # a server that sends: would read the target's files
    lambda a: a.__setitem__(2, a[2].replace("-", "-l", 1)),  # symbolic links
    lambda a: a.__setitem__(2, a[2].replace("-", "-D", 1)),  # devices
    lambda a: a.insert(3, "--remove-source-files"),
    lambda a: a.insert(3, "--log-file=/etc/passwd"),
    lambda a: a.insert(3, "--bwlimit=fast"),
    lambda a: a.insert(3, "--compress-choice=zlib"),
    lambda a: a.insert(3, "--compress-level=22"),
    lambda a: a.insert(3, "--numeric-ids"),  # twice
    lambda a: a.__setitem__(-1, "/etc/"),  # the destination is the target's choice
    lambda a: a.__setitem__(0, "sh"),
])
def test_the_target_refuses_any_other_command_line(tmp_path: Path, change: Any) -> None:
    args = server_args_of(tmp_path)
    changed = copy.copy(args)
    change(changed)
    with pytest.raises(Refused) as err:
        check_server_args(changed, "/staging/vms/pg01")
    assert err.value.field == "request.args"


# ------------------------------------------------------------------------------------------------
# the webhook's rules
# ------------------------------------------------------------------------------------------------
NODES = FileCluster([{"kind": "Node", "metadata": {"name": "node-a"}},
                     {"kind": "Node", "metadata": {"name": "node-b"}}])


def vm(*, home: str | None = "node-a", strategy: str = "Halted", **annotations: str) -> dict[str, Any]:
    ann = dict(annotations)
    if home is not None:
        ann[K.ANN_NODE] = home
    return {"apiVersion": "kubevirt.io/v1", "kind": "VirtualMachine",
            "metadata": {"name": "pg01", "namespace": "vms", "annotations": ann},
            "spec": {"runStrategy": strategy, "template": {"spec": {}}}}


def check(new: dict[str, Any], old: dict[str, Any] | None, *, user: str = "alice",
          cluster: object = NODES) -> tuple[Any, tuple[str, ...]]:
    return check_migration(new, old, operation="UPDATE" if old is not None else "CREATE", username=user,
                           policy=POLICY, namespace="vms", cluster=cluster)


def refused(new: dict[str, Any], old: dict[str, Any] | None, **kw: Any) -> Refused:
    with pytest.raises(Refused) as err:
        check(new, old, **kw)
    return err.value


ASK = {ANN_MIGRATE_TO: "node-b"}
STATUS_ANN = {ANN_MIGRATION_STATUS: status_json(STATUS)}


def test_a_user_may_ask_to_move_a_stopped_homed_vm_to_an_existing_node() -> None:
    assert check(vm(**ASK), vm()) == (vm(**ASK), ())
    assert check(vm(**ASK, **{ANN_MIGRATE_DELETE_SOURCE: "true"}), vm())[1] == ()
    assert check(vm(**ASK), vm(**ASK))[1] == ()  # the same request again changes nothing


@pytest.mark.parametrize("new, old, words", [
    (vm(**{ANN_MIGRATE_TO: "node-c"}), vm(), "no Node named 'node-c'"),
    (vm(**{ANN_MIGRATE_TO: "Node_B"}), vm(), "not a node name"),
    (vm(**{ANN_MIGRATE_TO: "node-a"}), vm(), "already the VM's home"),
    (vm(home=None, **ASK), vm(home=None), "no home node yet"),
    (vm(strategy="Always", **ASK), vm(strategy="Always"), "only a stopped VM can migrate"),
    (vm(**{ANN_MIGRATE_TO: "node-c"}), vm(**ASK), "under way; withdraw it first"),
    (vm(**ASK), vm(**{ANN_MIGRATION_STATUS: status_json(STATUS)}), "still Copying"),
    (vm(**{ANN_MIGRATE_DELETE_SOURCE: "true"}), vm(), "goes only with"),
    (vm(**ASK, **{ANN_MIGRATE_DELETE_SOURCE: "yes"}), vm(), '"true" or "false"'),
    (vm(**ASK, **{ANN_MIGRATE_DELETE_SOURCE: "true"}), vm(**ASK), "cannot change while"),
    (vm(**ASK, **STATUS_ANN), vm(**ASK), "node agents only"),
    (vm(strategy="Always", **ASK), vm(**ASK), "cannot start until the migration ends"),
])
def test_what_a_user_may_not_do(new: dict[str, Any], old: dict[str, Any], words: str) -> None:
    assert words in str(refused(new, old))


def test_a_request_needs_the_lookups_and_no_vmi() -> None:
    with_vmi = FileCluster([*[{"kind": "Node", "metadata": {"name": n}} for n in ("node-a", "node-b")],
                            {"kind": "VirtualMachineInstance", "metadata": {"name": "pg01", "namespace": "vms"},
                             "status": {"phase": "Running"}}])
    assert "still has a VirtualMachineInstance (phase Running)" in str(refused(vm(**ASK), vm(), cluster=with_vmi))
    assert "cannot look up Nodes" in str(refused(vm(**ASK), vm(), cluster=object()))


def test_a_new_vm_cannot_carry_migration_annotations() -> None:
    for ann in (ASK, STATUS_ANN):
        assert refused(vm(**ann), None).field.startswith("metadata.annotations[diskhooks.io/migrat")


def test_users_may_withdraw_and_their_updates_keep_the_status() -> None:
    new, notes = check(vm(**STATUS_ANN), vm(**ASK, **STATUS_ANN))
    assert ANN_MIGRATE_TO not in new["metadata"]["annotations"] and "withdrawn" in notes[0]
    kept, _ = check(vm(**ASK), vm(**ASK, **STATUS_ANN))  # kubectl replace without the status
    assert kept["metadata"]["annotations"][ANN_MIGRATION_STATUS] == STATUS_ANN[ANN_MIGRATION_STATUS]


def test_what_the_agent_may_do() -> None:
    asking = vm(**ASK)
    handover = vm(home="node-b", **STATUS_ANN)
    assert check(handover, asking, user=AGENT)[1] == ()  # home to the asked node, request removed
    assert check(vm(**ASK, **STATUS_ANN), asking, user=AGENT)[1] == ()  # progress
    assert check(vm(**STATUS_ANN), asking, user=AGENT)[1] == ()  # failed: request removed
    for new, old, words in [
        (vm(**ASK), vm(), "never make or change one"),
        (vm(**{ANN_MIGRATE_TO: "node-c"}), asking, "never make or change one"),
        (vm(**ASK, **{ANN_MIGRATION_STATUS: "{}"}), asking, "id"),
        (vm(home="node-c"), asking, "only to the node its migration request names"),
        (vm(home="node-b"), vm(), "only to the node its migration request names"),
        (vm(home="node-b", **ASK), asking, "must remove the migration request"),
        (vm(home="node-b", strategy="Always"), vm(strategy="Always", **ASK), "may run cannot move"),
    ]:
        assert words in str(refused(new, old, user=AGENT)), (new, old)


# ------------------------------------------------------------------------------------------------
# mutual TLS and the bridge, over real sockets
# ------------------------------------------------------------------------------------------------
def serve_once(tls: TlsFiles, handler: Any) -> tuple[int, threading.Thread, list[BaseException]]:
    listener = socket.create_server(("127.0.0.1", 0))
    errors: list[BaseException] = []

    def run() -> None:
        conn, _ = listener.accept()
        listener.close()
        conn.setblocking(False)
        try:
            channel = TlsChannel(conn, tls.server_context(), server_side=True)
            channel.handshake(10)
            handler(channel)
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            errors.append(exc)
        finally:
            conn.close()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return int(listener.getsockname()[1]), t, errors


def connect(port: int, tls: TlsFiles, name: str = PEER_NAME) -> TlsChannel:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.setblocking(False)
    channel = TlsChannel(sock, tls.client_context(), server_side=False, server_hostname=name)
    channel.handshake(10)
    return channel


def test_only_a_certificate_from_the_ca_gets_in(tmp_path: Path) -> None:
    ca = make_tls(tmp_path / "server")
    good = TlsFiles(str(tmp_path / "good"))
    make_tls(tmp_path / "good", ca=ca)
    stranger = tmp_path / "stranger"
    make_tls(stranger)  # its own CA
    (stranger / "ca.crt").write_bytes((tmp_path / "server" / "ca.crt").read_bytes())  # trusts ours
    server = TlsFiles(str(tmp_path / "server"))

    port, t, errors = serve_once(server, lambda ch: ch.send_all(b"hello\n"))
    line, _ = connect(port, good).read_line(100)
    t.join(10)
    assert line == b"hello" and not errors

    port, t, errors = serve_once(server, lambda ch: ch.send_all(b"hello\n"))
    with pytest.raises(BridgeError):
        connect(port, TlsFiles(str(stranger))).read_line(100)
    t.join(10)
    assert errors and "handshake failed" in str(errors[0])

    no_cert = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    no_cert.load_verify_locations(server.ca)
    port, t, errors = serve_once(server, lambda ch: ch.send_all(b"hello\n"))
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.setblocking(False)
    anonymous = TlsChannel(sock, no_cert, server_side=False, server_hostname=PEER_NAME)
    with pytest.raises(BridgeError):
        anonymous.handshake(10)
        anonymous.read_line(100)
    t.join(10)
    assert errors and "handshake failed" in str(errors[0])

    port, t, errors = serve_once(server, lambda ch: ch.send_all(b"hello\n"))
    with pytest.raises(BridgeError, match="handshake failed"):
        connect(port, good, name="someone-else")  # the server's name is checked
    t.join(10)


def test_the_bridge_moves_both_directions_and_ends_cleanly(tmp_path: Path) -> None:
    ca = make_tls(tmp_path / "a")
    make_tls(tmp_path / "b", ca=ca)
    up, down = os.urandom(3 << 20), os.urandom(5 << 20)
    got: dict[str, bytes] = {}

    def server(ch: TlsChannel) -> None:  # as the target: rsync --server's pipes
        in_r, in_w = os.pipe()  # what the server "process" reads
        out_r, out_w = os.pipe()  # what it writes

        def process() -> None:
            chunks = []
            while data := os.read(in_r, 65536):
                chunks.append(data)
            got["server"] = b"".join(chunks)
            os.close(in_r)

        reader = threading.Thread(target=process)

        def writer() -> None:  # as rsync --server: it ends (closes its output) after its input
            _write_all(out_w, down)
            reader.join(30)
            os.close(out_w)

        threads = [reader, threading.Thread(target=writer)]
        for t in threads:
            t.start()
        pump(ch, out_r, in_w, until="local")
        os.close(out_r)
        for t in threads:
            t.join(10)

    port, t, errors = serve_once(TlsFiles(str(tmp_path / "a")), server)
    channel = connect(port, TlsFiles(str(tmp_path / "b")))
    c_in_r, c_in_w = os.pipe()
    c_out_r, c_out_w = os.pipe()
    def feed() -> None:
        _write_all(c_in_w, up)
        os.close(c_in_w)

    feeder = threading.Thread(target=feed)
    chunks: list[bytes] = []
    reader = threading.Thread(target=lambda: chunks.extend(iter(lambda: os.read(c_out_r, 65536), b"")))
    feeder.start()
    reader.start()
    pump(channel, c_in_r, c_out_w, until="peer")
    reader.join(10)
    feeder.join(10)
    t.join(10)
    assert not errors
    assert b"".join(chunks) == down and got["server"] == up


def test_the_bridge_half_closes_only_when_nothing_is_in_flight(tmp_path: Path) -> None:
    """Our side's input ends while the peer's records still wait, undecrypted, in the TLS object's
    input (the output pipe is slow): sending close_notify then (OpenSSL reads on for the peer's
    close_notify and drops the records it meets) lost data and broke the stream. The half-close
    waits until what arrived is decrypted."""
    ca = make_tls(tmp_path / "a")
    make_tls(tmp_path / "b", ca=ca)
    down = os.urandom(12 << 20)
    sent = threading.Event()

    def server(ch: TlsChannel) -> None:  # sends everything at once, then ends after the client
        out_r, out_w = os.pipe()
        in_r, in_w = os.pipe()
        def write() -> None:
            _write_all(out_w, down)
            sent.set()
            os.close(out_w)

        writer = threading.Thread(target=write)
        drain = threading.Thread(target=lambda: list(iter(lambda: os.read(in_r, 65536), b"")))
        writer.start()
        drain.start()
        pump(ch, out_r, in_w, until="local")
        os.close(out_r)
        writer.join(10)
        drain.join(10)
        os.close(in_r)

    port, t, errors = serve_once(TlsFiles(str(tmp_path / "a")), server)
    channel = connect(port, TlsFiles(str(tmp_path / "b")))
    c_in_r, c_in_w = os.pipe()
    os.close(c_in_w)  # nothing to send: our input ends at once
    c_out_r, c_out_w = os.pipe()
    chunks: list[bytes] = []

    def slow_reader() -> None:
        sent.wait(10)
        time.sleep(0.3)  # the records pile up in the socket and in TLS's input meanwhile
        chunks.extend(iter(lambda: os.read(c_out_r, 65536), b""))

    reader = threading.Thread(target=slow_reader)
    reader.start()
    time.sleep(0.3)  # the first records are in our socket before the loop starts
    pump(channel, c_in_r, c_out_w, until="peer", idle_timeout=20)
    reader.join(20)
    t.join(20)
    os.close(c_in_r)
    os.close(c_out_r)
    assert not errors
    assert b"".join(chunks) == down


def test_a_server_process_that_stops_reading_still_gets_its_last_words_to_the_peer(tmp_path: Path) -> None:
    """As rsync --server failing (a full disk): it writes its error to the client and exits while the
    client still sends. The target's side stops passing the peer's bytes to the gone process and
    drops them, sends the process's last words with close_notify, and waits for the peer's end: a
    reset instead would have thrown the words away on the client (it saw only "connection reset")."""
    ca = make_tls(tmp_path / "a")
    make_tls(tmp_path / "b", ca=ca)
    words = b"rsync: [receiver] write failed: No space left on device (28)\n"

    def server(ch: TlsChannel) -> None:
        in_r, in_w = os.pipe()  # the process's input
        out_r, out_w = os.pipe()  # its output

        def process() -> None:  # reads a little, says why it stops, exits (both ends closed)
            os.read(in_r, 65536)
            os.close(in_r)
            _write_all(out_w, words)
            os.close(out_w)

        p = threading.Thread(target=process)
        p.start()
        pump(ch, out_r, in_w, until="local", idle_timeout=20)
        os.close(out_r)
        p.join(10)

    port, t, errors = serve_once(TlsFiles(str(tmp_path / "a")), server)
    channel = connect(port, TlsFiles(str(tmp_path / "b")))
    c_in_r, c_in_w = os.pipe()
    c_out_r, c_out_w = os.pipe()
    stop = threading.Event()

    def feed() -> None:  # the client goes on sending until it has read the server's words
        block = os.urandom(1 << 20)
        try:
            while not stop.is_set():
                _write_all(c_in_w, block)
        except BrokenPipeError:
            pass
        os.close(c_in_w)

    chunks: list[bytes] = []

    def read() -> None:
        chunks.extend(iter(lambda: os.read(c_out_r, 65536), b""))
        stop.set()

    threads = [threading.Thread(target=feed), threading.Thread(target=read)]
    for th in threads:
        th.start()
    try:
        pump(channel, c_in_r, c_out_w, until="peer", idle_timeout=20)
    finally:
        stop.set()
        os.close(c_in_r)  # a feeder blocked on a full pipe ends
        for th in threads:
            th.join(20)
        t.join(20)
        os.close(c_out_r)
    assert not errors
    assert b"".join(chunks) == words


def test_the_out_buffer_keeps_the_bytes_in_order_across_compaction() -> None:
    """Records land at the end, the pipe takes from the front; room is made by moving a small rest
    to the front, never by dropping or reordering bytes, and a big rest waits for the pipe."""
    out = OutBuffer(b"early")
    wrote = bytearray()
    sent = bytearray(b"early")
    counter = 0
    while len(sent) < 3 * OUT_BUFFER:
        while out.room():
            record = bytes([counter % 251]) * RECORD
            counter += 1
            out.tail()[:RECORD] = record
            out.end += RECORD
            sent += record
        assert len(out) > COMPACT_AT  # no room only while a big rest waits for the pipe
        take = len(out) - COMPACT_AT // 2  # the pipe takes most of it
        wrote += out.head()[:take]
        out.consume(take)
    wrote += out.head()
    out.consume(len(out))
    assert not out and bytes(wrote) == bytes(sent)


def test_a_full_pipe_is_retried_after_a_sleep_sized_to_the_pipe() -> None:
    r, w = os.pipe()
    a, b = socket.socketpair()
    try:
        assert pipe_backoff(w) == 0  # 64 KiB: rsync empties it faster than a sleep is worth
        widen_pipe(w)
        assert 0 < pipe_backoff(w) <= 0.0005  # 1 MiB: rsync needs a while for half of it
        assert pipe_backoff(a.fileno()) == 0  # rsync's remote shell gets a socket: no pipe size
    finally:
        for fd in (r, w):
            os.close(fd)
        a.close()
        b.close()


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def test_a_connection_cut_without_close_notify_is_an_error(tmp_path: Path) -> None:
    ca = make_tls(tmp_path / "a")
    make_tls(tmp_path / "b", ca=ca)
    port, t, _ = serve_once(TlsFiles(str(tmp_path / "a")), lambda ch: ch.sock.shutdown(socket.SHUT_RDWR))
    channel = connect(port, TlsFiles(str(tmp_path / "b")))
    r, w = os.pipe()
    out_r, out_w = os.pipe()
    with pytest.raises(BridgeError, match="cut off|failed"):
        pump(channel, r, out_w, until="peer", idle_timeout=10)
    t.join(10)
    for fd in (r, w, out_r):
        os.close(fd)


def test_tls_files_missing_or_unusable(tmp_path: Path) -> None:
    tls = TlsFiles(str(tmp_path))
    assert len(tls.missing()) == 3
    (tmp_path / "ca.crt").write_text("not a certificate")
    (tmp_path / "tls.crt").write_text("x")
    (tmp_path / "tls.key").write_text("x")
    assert stat.S_ISREG(os.stat(tls.ca).st_mode)
    with pytest.raises(Exception, match="not usable"):
        tls.server_context()


# ------------------------------------------------------------------------------------------------
# the command's helpers
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text, seconds", [("90", 90), ("90s", 90), ("15m", 900), ("1h30m", 5400),
                                           ("0", 0), ("1.5s", 1.5)])
def test_durations(text: str, seconds: float) -> None:
    assert duration(text) == seconds


@pytest.mark.parametrize("text", ["", "fast", "-1", "1d", "m"])
def test_bad_durations(text: str) -> None:
    with pytest.raises(Exception, match="duration|negative"):
        duration(text)


def test_the_progress_line() -> None:
    s = STATUS.advanced(bytes=512 << 20, total=2 << 30, rate=64 << 20)
    line = progress_line(s, width=10)
    assert line.startswith("Copying     [##........] 512.0 MiB / 2.0 GiB  25%  64.0 MiB/s  ETA 0:24")
    assert eta(s.advanced(rate=0)) == "--" and human(1023) == "1023 B"
    assert "retrying: x" in progress_line(s.advanced(error="retrying: x"))


def test_the_target_takes_only_the_agents_certificate_from_a_shared_ca(tmp_path: Path) -> None:
    """cert-manager's CA Issuer signs the webhook's certificate too: the target lets in only a client
    whose certificate names diskhooks-node-migration (before anything else is read)."""
    from hooksidecar.logfmt import JsonLog
    from nodeagent.migrate.target import TargetServer
    from nodeagent.reconcile import Paths

    ca = make_tls(tmp_path / "agent")
    make_tls(tmp_path / "other", name="diskhooks-webhook.diskhooks-system.svc", ca=ca)
    (tmp_path / "other" / "ca.crt").write_bytes((tmp_path / "agent" / "ca.crt").read_bytes())
    log_lines = tmp_path / "log"
    with open(log_lines, "w") as log_file:
        server = TargetServer(node="node-b", kube=None, policy=lambda: POLICY,  # type: ignore[arg-type]
                              paths=Paths(host_prefix=str(tmp_path), kubelet_pods_dir="/pods"),
                              tls=TlsFiles(str(tmp_path / "agent")), address="127.0.0.1", port=0,
                              log=JsonLog(log_file))
        server.start()
        try:
            channel = connect(server.port, TlsFiles(str(tmp_path / "other")))  # the server's name is fine
            with pytest.raises(BridgeError):
                channel.send_all(b'{"op": "abort"}\n')
                channel.read_line(1000, 10)
            channel.sock.close()
        finally:
            server.stop()
    assert "not for diskhooks-node-migration" in log_lines.read_text()


def test_a_long_error_keeps_its_beginning_and_its_end() -> None:
    from diskplan.migration import MAX_ERROR_CHARS, clip_error

    assert clip_error("short") == "short"
    exact = "x" * MAX_ERROR_CHARS
    assert clip_error(exact) == exact
    long = "node b has 10 bytes free; " + "y" * 2000 + "; nothing was copied"
    clipped = clip_error(long)
    assert len(clipped) == MAX_ERROR_CHARS
    assert clipped.startswith("node b has 10 bytes free; ") and clipped.endswith("; nothing was copied")
    assert " ... " in clipped


def test_a_request_lists_at_most_max_files_files() -> None:
    from diskplan.errors import Malformed
    from diskplan.migration import MAX_FILES, FileEntry, WireRequest, parse_request, request_json

    def request(count: int) -> WireRequest:
        return WireRequest(op="preflight", id="0123456789abcdef", namespace="ns", vm="vm", vm_uid="u",
                           source="node-a", target="node-b",
                           files=tuple(FileEntry(f"d{i}.qcow2", 1, 1, "0" * 64) for i in range(count)))

    assert len(parse_request(request_json(request(MAX_FILES))).files) == MAX_FILES
    with pytest.raises(Malformed) as err:
        request_json(request(MAX_FILES + 1))  # the writer checks what it writes with the same reader
    assert "request.files" in str(err.value) and f"at most {MAX_FILES}" in str(err.value)
