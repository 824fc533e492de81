"""rsync's remote shell for a migration: ``python -m nodeagent.migrate.connector HOST rsync --server ...``.

The source agent runs ``rsync -e '<python> -m nodeagent.migrate.connector' DIR/ target:staging/``;
rsync starts this program with the host and the command it wants run remotely. Instead of a shell,
it opens a mutual-TLS connection to the target agent (address, port, TLS directory and the request
in the environment variable :data:`ENV_CONNECT`, set by the agent for this one rsync), sends the
request with rsync's command line (the target checks both and runs its own ``rsync --server`` into
its staging directory), reads the answer, then joins its stdin/stdout to the connection
(:mod:`nodeagent.migrate.bridge`). A refusal or a failed connection is one line on stderr (which the
agent reads) and exit status 255, as ssh does.
"""

from __future__ import annotations

import json
import socket
import sys
from collections.abc import Sequence

from diskplan.errors import Malformed
from diskplan.migration import parse_reply
from nodeagent.migrate.bridge import BridgeError, TlsChannel, pump, widen_pipe
from nodeagent.migrate.tlsfiles import PEER_NAME, TlsFiles, TlsFilesError

ENV_CONNECT = "DISKHOOKS_MIGRATE_CONNECT"
EXIT_FAILED = 255
CONNECT_TIMEOUT = 10.0
IDLE_TIMEOUT = 600.0  # rsync keeps a stream busy; ten silent minutes mean the peer is gone


class ConnectError(Exception):
    pass


def open_channel(address: str, port: int, tls: TlsFiles, *,
                 timeout: float = CONNECT_TIMEOUT) -> TlsChannel:
    """A connected, handshaken mutual-TLS channel to the agent at ``address:port``."""
    try:
        ctx = tls.client_context()
    except TlsFilesError as exc:
        raise ConnectError(str(exc)) from None
    try:
        sock = socket.create_connection((address, port), timeout=timeout)
    except OSError as exc:
        raise ConnectError(f"cannot connect to the target agent at {address}:{port}: "
                           f"{exc.strerror or exc}") from None
    sock.setblocking(False)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    channel = TlsChannel(sock, ctx, server_side=False, server_hostname=PEER_NAME)
    try:
        channel.handshake(timeout)
    except BridgeError as exc:
        sock.close()
        raise ConnectError(f"{address}:{port}: {exc}") from None
    return channel


def exchange(channel: TlsChannel, request: bytes, *, timeout: float) -> tuple[dict[str, object], bytes]:
    """Send one request line, read the answer line; the answer and what followed it."""
    try:
        channel.send_all(request, timeout)
        line, rest = channel.read_line(64 * 1024, timeout)
        return parse_reply(line), rest
    except (BridgeError, Malformed) as exc:
        raise ConnectError(f"the target agent did not answer: {exc}") from None


def main(argv: Sequence[str] | None = None) -> int:
    import os

    args = list(sys.argv[1:] if argv is None else argv)
    try:
        config = json.loads(os.environ[ENV_CONNECT])
        address, port, tls_dir = str(config["address"]), int(config["port"]), str(config["tlsDir"])
        request = dict(config["request"])
    except (KeyError, ValueError, TypeError):
        print(f"connector: {ENV_CONNECT} is missing or not usable (this program is started by the "
              "diskhooks node agent's rsync)", file=sys.stderr)
        return EXIT_FAILED
    if len(args) < 2:
        print("connector: usage: connector HOST rsync --server ...", file=sys.stderr)
        return EXIT_FAILED
    request["args"] = args[1:]
    line = json.dumps(request, separators=(",", ":")).encode() + b"\n"
    try:
        channel = open_channel(address, port, TlsFiles(tls_dir))
        reply, rest = exchange(channel, line, timeout=CONNECT_TIMEOUT * 3)
    except ConnectError as exc:
        print(f"connector: {exc}", file=sys.stderr)
        return EXIT_FAILED
    if not reply.get("ok"):
        print(f"connector: the target agent refused: {reply.get('error')}", file=sys.stderr)
        channel.sock.close()
        return EXIT_FAILED
    for fd in (sys.stdin.fileno(), sys.stdout.fileno()):
        widen_pipe(fd)
    try:
        pump(channel, sys.stdin.fileno(), sys.stdout.fileno(), until="peer", early=rest,
             idle_timeout=IDLE_TIMEOUT)
    except BridgeError as exc:
        print(f"connector: {exc}", file=sys.stderr)
        return EXIT_FAILED
    finally:
        channel.sock.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
