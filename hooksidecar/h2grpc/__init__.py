"""A unary-only gRPC server on a unix socket, on a small HTTP/2 layer of its own (HPACK by ``hpack``).

Why: ``import grpc`` alone costs ~27 MiB of resident memory and the hook sidecar runs under a 64M
limit. The hook API is four unary methods whose messages the sidecar already encodes itself, so all
it needs from gRPC is the wire: HTTP/2 (:mod:`.http2`: the frames, SETTINGS, PING, flow control and
stream states a gRPC client uses, strictly validated; HPACK from the ``hpack`` package; it replaced
the general ``h2`` state machine, which cost more per connection than the hook call itself, see
docs/ARCHITECTURE.md) plus gRPC's small conventions on top:

- a request is ``POST <path>`` with ``content-type: application/grpc[+proto|;...]`` (else HTTP 415);
- its body is exactly one length-prefixed message: flag byte (``0`` = not compressed; ``1`` is
  refused with UNIMPLEMENTED, anything else with INTERNAL) and a 4-byte big-endian length; a
  message over ``max_message_bytes`` is RESOURCE_EXHAUSTED, answered as soon as its prefix says so;
- the answer is HEADERS (``:status 200``, ``content-type: application/grpc``), one DATA message, and
  trailers ``grpc-status`` / ``grpc-message`` (percent-encoded) with END_STREAM; an error is a
  trailers-only answer. An unknown path is UNIMPLEMENTED. ``grpc-timeout`` is ignored.

What this package may do: sockets, threads, HTTP/2. What it may not: know anything about the hook
API. Its modules: :mod:`.http2` (one HTTP/2 connection's frames and states, no sockets),
:mod:`.grpcwire` (gRPC's conventions, pure), :mod:`.connection` (one client
connection), :mod:`.workers` (the worker threads), :mod:`.server` (:class:`H2GrpcServer`: the
listener, what the workers share, the stop), :mod:`.limits` (bounds and timers), :mod:`.memory`
(the C heap given back after a large call).
Handlers are ``request bytes -> response bytes`` functions that raise :class:`RpcStatus` for an
error status; any other exception becomes INTERNAL.

Threads: ``max_connections`` workers, started with the server (see
:class:`~hooksidecar.h2grpc.workers.Worker`); at most ``max_connections`` connections are open at once, further clients wait in the listen backlog. One
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
REFUSED_STREAM) so the client may retry elsewhere. Memory: glibc keeps what a call freed in the
worker's malloc arena (nothing stays allocated: the freed pages are not given back), so after a call
whose request or answer is over ``limits.TRIM_AFTER_BYTES`` (128 KiB; KubeVirt's domains are 3-6 KiB)
the connection calls ``malloc_trim(0)`` once the call is answered or cut (:mod:`.memory`, glibc only,
~3 ms): after a call on the largest domain the sidecar accepts RSS is back within ~0.9 MiB of its
level before the call (paid once, not per call; ``python -m benchmarks sidecar``, section (e)),
where it stayed ~18 MiB above it. The peak is one call's.

Not supported (none is used by the hook API or virt-launcher): streaming RPCs, compression,
deadlines (``grpc-timeout``), request/response metadata beyond the status, TLS, h2c upgrade (the
client must speak HTTP/2 with prior knowledge, as every gRPC client does), server push.
"""

from hooksidecar.h2grpc.grpcwire import (
    PREFIX_BYTES,
    Handler,
    RpcStatus,
    StatusCode,
    check_prefix,
    frame_message,
    is_grpc_content_type,
    percent_encode,
    status_headers,
    unframe_request,
)
from hooksidecar.h2grpc.limits import MAX_CONNECTIONS, MAX_MESSAGE_BYTES
from hooksidecar.h2grpc.server import H2GrpcServer, Log

__all__ = ["MAX_CONNECTIONS", "MAX_MESSAGE_BYTES", "PREFIX_BYTES", "H2GrpcServer", "Handler", "Log", "RpcStatus",
           "StatusCode", "check_prefix", "frame_message", "is_grpc_content_type", "percent_encode",
           "status_headers", "unframe_request"]
