"""The hook sidecar's gRPC service: KubeVirt's ``Info`` and ``Callbacks`` (v1alpha1-3) on a unix socket.

Thin: the servicers decode a request, call :func:`hooksidecar.callback.on_define_domain` with the
plan verified at Pod admission (:attr:`SidecarSettings.admitted_plan`, never the VMI's own), encode the
answer, map the two error families to gRPC codes (``Malformed`` -> INVALID_ARGUMENT, ``Refused`` ->
FAILED_PRECONDITION, anything else -> INTERNAL) and log one JSON line per call. No decision about
disks is taken here.

Transport-independent method table. :func:`method_table` maps each served path
(``/kubevirt.hooks.v1alpha3.Callbacks/OnDefineDomain``, ...) to a ``request bytes -> response
bytes`` function that raises :class:`hooksidecar.h2grpc.RpcStatus` for an error status. Two
transports serve that table: ``h2`` (the default, :mod:`hooksidecar.h2grpc`: a pure-Python HTTP/2
layer of its own, HPACK from the ``hpack`` package; the name is HTTP/2's own) and ``grpcio``
(:func:`generic_handlers`, grpcio's C core, ~27 MiB just to import; kept for comparison and as a
fallback, needs grpcio installed, which the sidecar image does not ship). The sidecar runs under a
64M limit.

Wire format. Every message of this API holds only ``bytes``/``string`` fields, plus ``InfoResult``'s
repeated ``HookPoint`` (a string and an int32). The server therefore does not load the protobuf
runtime: handlers receive and return raw bytes and use the small codec below
(:func:`decode_fields`, :func:`encode_bytes_field`, :func:`encode_info_result`). Measured on this
machine, the protobuf runtime and the generated modules add about 2.8 MiB of peak RSS;
``tests/test_sidecar_server.py`` checks the codec against the modules generated from
``hooksidecar/protos/`` (``hooksidecar/_pb/``), which the tests use as virt-launcher.

Lifecycle. :class:`HookServer` refuses to take over a live socket or a non-socket file, replaces a
stale socket, serves (h2: four worker threads started once, at most four connections, calls one
after the other all in one warm thread; grpcio: a two-thread pool; either way one ``OnDefineDomain``
runs at a time, so peak memory is one call's, and a request larger than the core's input bounds is
refused before it is buffered whole; a call's log line is written once its answer is on its way), and
stops gracefully (answer in-flight calls, then close) on SIGTERM/SIGINT or a ``Shutdown`` call; the
socket is removed on exit. Signals and the ``Shutdown``
servicer wake the main thread through a pipe (``signal.set_wakeup_fd``), so no lock is ever taken in a
signal handler and a signal delivered to one of the transport's own threads still wakes it.
"""

from __future__ import annotations

import collections
import errno
import os
import signal
import socket
import stat
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import IO, TYPE_CHECKING, Any, NoReturn

from diskplan.errors import Malformed, Refused
from diskplan.keys import HOOK_VERSIONS
from hooksidecar import logfmt
from hooksidecar.callback import MAX_VMI_JSON_BYTES, on_define_domain
from hooksidecar.h2grpc import H2GrpcServer, RpcStatus, StatusCode
from hooksidecar.xmlsafe import MAX_DOMAIN_XML_BYTES

if TYPE_CHECKING:
    import grpc

HOOK_NAME = "diskhooks"
DEFAULT_SOCKET_DIR = "/var/run/kubevirt-hooks"
# one OnDefineDomainParams: the largest domain XML and VMI JSON the core accepts, plus field headers
MAX_MESSAGE_BYTES = MAX_DOMAIN_XML_BYTES + MAX_VMI_JSON_BYTES + 4096
OVERSIZE_NOTE = (f"the diskhooks sidecar accepts a domain XML of at most {MAX_DOMAIN_XML_BYTES // 1024} KiB "
                 f"and a VMI JSON of at most {MAX_VMI_JSON_BYTES // 1024} KiB")
DEFAULT_GRACE_SECONDS = 5.0
#: a call's log line compares the domain XML received and answered; up to this size (KubeVirt's
#: domains are 3-6 KiB) it is written once the answer is on its way, not on the caller's time
DEFERRED_LOG_BYTES = 128 * 1024
THREADS = 2  # grpcio: virt-launcher calls one hook at a time; a second thread serves Info/Shutdown meanwhile
MAX_CONCURRENT_RPCS = 8
MAX_CONNECTIONS = 4  # h2: open at once, and worker threads; virt-launcher dials one connection per call
TRANSPORTS = ("h2", "grpcio")
DEFAULT_TRANSPORT = "h2"
UNIX_PATH_MAX = 107  # sun_path is 108 bytes including the terminating NUL

INFO_SERVICE = "kubevirt.hooks.info.Info"
ON_DEFINE_DOMAIN = "OnDefineDomain"
PRE_CLOUD_INIT_ISO = "PreCloudInitIso"
SHUTDOWN = "Shutdown"

# field numbers (hooksidecar/protos/*.proto)
F_DOMAIN_XML, F_VMI = 1, 2  # OnDefineDomainParams; OnDefineDomainResult.domainXML = 1
F_CI_SOURCE, F_CI_VMI, F_CI_DATA = 1, 2, 3  # PreCloudInitIsoParams / Result (no field 2 in Result)
F_INFO_NAME, F_INFO_HOOK_POINTS, F_INFO_VERSIONS = 1, 3, 4
F_HP_NAME, F_HP_PRIORITY = 1, 2

_WAKE_SHUTDOWN = b"\x00"


def callbacks_service(version: str) -> str:
    return f"kubevirt.hooks.{version}.Callbacks"


# ================================================================================================
# codec: the protobuf wire format for bytes-only messages
# ================================================================================================
class WireError(ValueError):
    """A request that is not a protobuf message of the expected shape."""


def _read_varint(data: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(data):
            raise WireError("truncated varint")
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7
        if shift >= 64:
            raise WireError("varint longer than 10 bytes")


def _varint(value: int) -> bytes:
    if value < 0:
        value += 1 << 64  # int32/int64 negatives are sent as 64-bit two's complement
    out = bytearray()
    while True:
        low = value & 0x7F
        value >>= 7
        if value:
            out.append(low | 0x80)
        else:
            out.append(low)
            return bytes(out)


def decode_fields(data: bytes, wanted: Iterable[int]) -> dict[int, bytes]:
    """The length-delimited fields ``wanted`` of a protobuf message (missing ones are ``b""``).

    proto3 semantics: the last occurrence of a field wins; fields not wanted are skipped whatever
    their wire type. Raises :class:`WireError` for truncated or invalid input, or when a wanted
    field arrives with a wire type other than length-delimited.
    """
    want = set(wanted)
    out = dict.fromkeys(want, b"")
    pos, end = 0, len(data)
    while pos < end:
        key, pos = _read_varint(data, pos)
        number, wire_type = key >> 3, key & 7
        if number == 0:
            raise WireError("field number 0")
        if wire_type == 2:
            length, pos = _read_varint(data, pos)
            if length > end - pos:
                raise WireError(f"field {number} is longer than the message")
            if number in want:
                out[number] = bytes(data[pos:pos + length])
            pos += length
            continue
        if number in want:
            raise WireError(f"field {number} has wire type {wire_type}, expected bytes")
        if wire_type == 0:
            _, pos = _read_varint(data, pos)
        elif wire_type == 1:
            pos += 8
        elif wire_type == 5:
            pos += 4
        else:
            raise WireError(f"unsupported wire type {wire_type} (field {number})")
        if pos > end:
            raise WireError(f"field {number} is truncated")
    return out


def encode_bytes_field(number: int, value: bytes) -> bytes:
    """One length-delimited field; proto3 leaves an empty value out."""
    if not value:
        return b""
    return _varint(number << 3 | 2) + _varint(len(value)) + value


def encode_info_result(*, name: str, hook_points: Iterable[tuple[str, int]],
                       versions: Iterable[str]) -> bytes:
    """``InfoResult{name=1, hookPoints=3 (HookPoint{name=1, priority=2}), versions=4}``."""
    parts = [encode_bytes_field(F_INFO_NAME, name.encode())]
    for point, priority in hook_points:
        body = encode_bytes_field(F_HP_NAME, point.encode())
        if priority:
            body += _varint(F_HP_PRIORITY << 3 | 0) + _varint(priority)
        parts.append(_varint(F_INFO_HOOK_POINTS << 3 | 2) + _varint(len(body)) + body)
    parts.extend(encode_bytes_field(F_INFO_VERSIONS, v.encode()) for v in versions)
    return b"".join(parts)


# ================================================================================================
# servicers
# ================================================================================================
@dataclass(frozen=True)
class SidecarSettings:
    """What the sidecar serves and how it calls the core."""

    #: hook name answered by Info (virt-launcher logs it)
    name: str = HOOK_NAME
    #: Callbacks versions served and advertised, most preferred first (``serve --version V`` gives V
    #: and every older version: virt-launcher takes the first it knows)
    versions: tuple[str, ...] = HOOK_VERSIONS
    #: prepended to every launcher path the image checks open (tests and demos; empty in a pod)
    path_prefix: str = ""
    #: check the images before answering (the CLI never turns this off when serving)
    check_images: bool = True
    #: seconds in-flight calls get to finish when stopping
    grace_seconds: float = DEFAULT_GRACE_SECONDS
    #: the plan verified when the launcher Pod was admitted (``DISKHOOKS_PLAN``), None when none was:
    #: the only plan applied; a VMI whose plan differs is refused (see hooksidecar.callback)
    admitted_plan: str | None = None

    def hook_points(self) -> tuple[tuple[str, int], ...]:
        points = [(ON_DEFINE_DOMAIN, 0)]
        if "v1alpha3" in self.versions:  # Shutdown exists only in v1alpha3
            points.append((SHUTDOWN, 0))
        return tuple(points)


OnDefine = Callable[..., bytes]


@dataclass
class Servicers:
    """The RPC implementations, as ``request bytes -> response bytes`` functions that raise
    :class:`RpcStatus` to answer with an error status."""

    settings: SidecarSettings
    log: logfmt.JsonLog
    request_shutdown: Callable[[], None]
    on_define: OnDefine = on_define_domain
    _info: bytes = field(init=False, repr=False)
    #: one OnDefineDomain at a time (virt-launcher never overlaps calls): the peak memory of the
    #: process is then one call's, whatever a client on the socket does
    _core: threading.Lock = field(init=False, repr=False, default_factory=threading.Lock)
    #: log lines of answered calls, written by :meth:`answered`
    _after_answer: collections.deque[Callable[[], None]] = field(init=False, repr=False,
                                                                 default_factory=collections.deque)

    def __post_init__(self) -> None:
        self._info = encode_info_result(name=self.settings.name, hook_points=self.settings.hook_points(),
                                        versions=self.settings.versions)

    def info(self, request: bytes) -> bytes:
        self.log.emit("call", hook="Info", result="ok", code="OK", ms=0.0)
        return self._info

    def on_define_domain(self, version: str) -> Callable[[bytes], bytes]:
        def handle(request: bytes) -> bytes:
            self.answered()
            started = time.perf_counter()
            fields: dict[str, Any] = {"hook": ON_DEFINE_DOMAIN, "version": version, "vmi": "?"}
            try:
                with self._core:
                    params = decode_fields(request, (F_DOMAIN_XML, F_VMI))
                    domain_xml, vmi_json = params[F_DOMAIN_XML], params[F_VMI]
                    fields["bytesIn"] = len(domain_xml)
                    result = self.on_define(domain_xml, vmi_json, path_prefix=self.settings.path_prefix,
                                            check_images=self.settings.check_images,
                                            admitted_plan=self.settings.admitted_plan,
                                            on_vmi=lambda vmi: fields.update(vmi=logfmt.identity_of(vmi)),
                                            on_facts=lambda facts: fields.update(
                                                logfmt.larger_than_planned(facts.larger_than_planned)))
            except WireError as exc:
                self._fail(fields, started, StatusCode.INVALID_ARGUMENT,
                           f"OnDefineDomainParams: not a valid protobuf message: {exc}")
            except Malformed as exc:
                self._fail(fields, started, StatusCode.INVALID_ARGUMENT, str(exc))
            except Refused as exc:
                self._fail(fields, started, StatusCode.FAILED_PRECONDITION, str(exc))
            except Exception as exc:  # noqa: BLE001 - a bug must still answer, with a reason, and be logged
                import traceback

                fields["trace"] = traceback.format_exc(limit=-8)
                self._fail(fields, started, StatusCode.INTERNAL,
                           f"internal error in the diskhooks sidecar: {type(exc).__name__}: {exc}")
            ms = _ms(started)
            if len(domain_xml) + len(result) <= DEFERRED_LOG_BYTES:
                self._after_answer.append(lambda: self._log_answer(fields, domain_xml, result, ms))
            else:  # a large domain: its two documents are not kept alive for the line while sending
                self._log_answer(fields, domain_xml, result, ms)
            return encode_bytes_field(F_DOMAIN_XML, result)

        return handle

    def pre_cloud_init_iso(self, version: str) -> Callable[[bytes], bytes]:
        def handle(request: bytes) -> bytes:
            started = time.perf_counter()
            fields: dict[str, Any] = {"hook": PRE_CLOUD_INIT_ISO, "version": version}
            try:
                params = decode_fields(request, (F_CI_SOURCE, F_CI_VMI, F_CI_DATA))
            except WireError as exc:
                self._fail(fields, started, StatusCode.INVALID_ARGUMENT,
                           f"PreCloudInitIsoParams: not a valid protobuf message: {exc}")
            fields["vmi"] = logfmt.vmi_identity(params[F_CI_VMI])
            self.log.emit("call", **fields, result="ok", code="OK", unchanged=True, ms=_ms(started))
            return (encode_bytes_field(F_CI_SOURCE, params[F_CI_SOURCE])
                    + encode_bytes_field(F_CI_DATA, params[F_CI_DATA]))

        return handle

    def shutdown(self, request: bytes) -> bytes:
        self.log.emit("call", hook=SHUTDOWN, version="v1alpha3", result="ok", code="OK", ms=0.0)
        self.request_shutdown()  # only wakes the main thread: this answer goes out before the stop
        return b""

    def _log_answer(self, fields: dict[str, Any], domain_xml: bytes, result: bytes, ms: float) -> None:
        unchanged = result is domain_xml or result == domain_xml
        self.log.emit("call", **fields, result="ok", code="OK", unchanged=unchanged,
                      disksRewritten=[] if unchanged else logfmt.changed_disks(domain_xml, result),
                      bytesOut=len(result), ms=ms)

    def answered(self) -> None:
        """Write the log lines of the calls answered so far. The transports call it once an answer
        is on its way (h2: handed to the socket; grpcio: returned to grpc): comparing the disks for
        the line is not on the caller's time. A handler also calls it first, so lines never wait
        for more than the next call."""
        while True:
            try:
                task = self._after_answer.popleft()
            except IndexError:
                return
            task()

    def _fail(self, fields: dict[str, Any], started: float, code: StatusCode, message: str) -> NoReturn:
        self.log.emit("call", **fields, result="error", code=code.name, error=message, ms=_ms(started))
        raise RpcStatus(code, message)


def _ms(started: float) -> float:
    return round((time.perf_counter() - started) * 1000, 3)


Handler = Callable[[bytes], bytes]


def method_table(servicers: Servicers) -> dict[str, Handler]:
    """Every served path (``/<service>/<method>``) and its handler; the same for every transport."""
    table: dict[str, Handler] = {f"/{INFO_SERVICE}/Info": servicers.info}
    for version in servicers.settings.versions:
        service = callbacks_service(version)
        table[f"/{service}/{ON_DEFINE_DOMAIN}"] = servicers.on_define_domain(version)
        if version in ("v1alpha2", "v1alpha3"):
            table[f"/{service}/{PRE_CLOUD_INIT_ISO}"] = servicers.pre_cloud_init_iso(version)
        if version == "v1alpha3":
            table[f"/{service}/{SHUTDOWN}"] = servicers.shutdown
    return table


def generic_handlers(table: dict[str, Handler],
                     answered: Callable[[], None] | None = None) -> list[grpc.GenericRpcHandler]:
    """The grpcio transport: one generic handler per service; requests and responses stay raw bytes.
    ``answered`` (optional) is called after every handler, as :class:`H2GrpcServer` calls its
    ``answered`` once the answer was sent."""
    import grpc

    def rpc(fn: Handler) -> grpc.RpcMethodHandler:
        def call(request: bytes, context: grpc.ServicerContext) -> bytes:
            try:
                return fn(request)
            except RpcStatus as exc:
                context.abort(grpc.StatusCode[exc.code.name], exc.message)  # raises
                raise AssertionError("grpc's abort returned") from None  # pragma: no cover
            finally:
                if answered is not None:
                    answered()

        return grpc.unary_unary_rpc_method_handler(call, request_deserializer=None, response_serializer=None)

    services: dict[str, dict[str, grpc.RpcMethodHandler]] = {}
    for path, fn in table.items():
        service, _, method = path[1:].partition("/")
        services.setdefault(service, {})[method] = rpc(fn)
    return [grpc.method_handlers_generic_handler(service, methods) for service, methods in services.items()]


# ================================================================================================
# the socket and the process
# ================================================================================================
class SocketInUse(Exception):
    """The socket path is taken by something that must not be replaced."""


def claim_socket_path(path: str) -> None:
    """Make ``path`` free for a new socket: remove a stale socket, refuse anything else.

    A socket somebody still accepts connections on is live (another sidecar): refused. A path that is
    not a socket (a file, a directory, a link) is never removed. Raises :class:`SocketInUse`.
    """
    if len(path.encode()) > UNIX_PATH_MAX:
        raise SocketInUse(f"socket path {path} is {len(path.encode())} bytes, longer than the "
                          f"{UNIX_PATH_MAX} a unix socket path can have")
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise SocketInUse(f"{path} exists and is not a socket; refusing to replace it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(path)
    except ConnectionRefusedError:
        pass  # nobody listens: stale, left by a sidecar that was killed
    except OSError as exc:
        if exc.errno not in (errno.ECONNREFUSED, errno.ENOENT):
            raise SocketInUse(f"cannot tell whether {path} is in use: {exc.strerror}") from None
    else:
        raise SocketInUse(f"{path} is a live socket (something accepts connections on it); "
                          "refusing to take it over")
    finally:
        probe.close()
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


class HookServer:
    """The gRPC server on ``socket_path``; :meth:`run` serves until a signal or ``Shutdown``."""

    def __init__(self, socket_path: str, settings: SidecarSettings, *, log: logfmt.JsonLog,
                 on_define: OnDefine = on_define_domain, transport: str = DEFAULT_TRANSPORT) -> None:
        if transport not in TRANSPORTS:
            raise ValueError(f"transport {transport!r} is not one of {', '.join(TRANSPORTS)}")
        self.socket_path = socket_path
        self.settings = settings
        self.log = log
        self.transport = transport
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)
        self._servicers = Servicers(settings=settings, log=log, request_shutdown=self._wake_for_shutdown,
                                    on_define=on_define)
        self._server: grpc.Server | H2GrpcServer | None = None
        self._socket_ino: int | None = None

    def _wake_for_shutdown(self) -> None:
        try:
            os.write(self._wake_w, _WAKE_SHUTDOWN)
        except BlockingIOError:
            pass  # the pipe already holds a wake-up

    def start(self) -> None:
        claim_socket_path(self.socket_path)
        table = method_table(self._servicers)
        if self.transport == "h2":
            h2_server = H2GrpcServer(self.socket_path, table, max_message_bytes=MAX_MESSAGE_BYTES,
                                     max_connections=MAX_CONNECTIONS, log=self.log.emit,
                                     answered=self._servicers.answered,
                                     oversize_note=OVERSIZE_NOTE)
            try:
                h2_server.start()
            except OSError as exc:
                raise SocketInUse(f"cannot listen on {self.socket_path}: {exc.strerror}") from None
            self._server = h2_server
        else:
            self._server = self._start_grpcio(table)
        try:
            self._socket_ino = os.lstat(self.socket_path).st_ino
        except OSError:
            self._socket_ino = None
        self.log.emit("serving", socket=self.socket_path, name=self.settings.name,
                      versions=list(self.settings.versions), pid=os.getpid(),
                      pathPrefix=self.settings.path_prefix or None, transport=self.transport,
                      verifiedPlan=self.settings.admitted_plan is not None)

    def _start_grpcio(self, table: dict[str, Handler]) -> grpc.Server:
        from concurrent import futures

        try:
            import grpc
        except ModuleNotFoundError:
            raise SocketInUse("--transport grpcio needs the grpcio package, which is not installed "
                              "(the default transport, h2, does not)") from None
        server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=THREADS, thread_name_prefix="hook"),
            handlers=generic_handlers(table, self._servicers.answered),
            options=[("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                     ("grpc.max_send_message_length", MAX_MESSAGE_BYTES)],
            maximum_concurrent_rpcs=MAX_CONCURRENT_RPCS,
        )
        try:
            server.add_insecure_port(f"unix://{self.socket_path}")
        except RuntimeError as exc:
            raise SocketInUse(f"cannot listen on {self.socket_path}: {exc}") from None
        server.start()
        return server

    def wait_for_stop(self) -> str:
        """Block until SIGTERM/SIGINT or a ``Shutdown`` call; the reason, e.g. ``"SIGTERM"``."""
        while True:
            try:
                byte = os.read(self._wake_r, 1)
            except InterruptedError:  # pragma: no cover - PEP 475 retries for us
                continue
            if byte == _WAKE_SHUTDOWN:
                return "Shutdown call"
            if byte:
                try:
                    return signal.Signals(byte[0]).name
                except ValueError:
                    return f"signal {byte[0]}"

    def stop(self, reason: str) -> None:
        """Stop accepting calls, let in-flight ones finish (``grace_seconds``), remove the socket."""
        if isinstance(self._server, H2GrpcServer):
            self._server.stop(self.settings.grace_seconds)
        elif self._server is not None:
            self._server.stop(self.settings.grace_seconds).wait()
        self._server = None
        self._remove_socket()
        self.log.emit("stopped", reason=reason, socket=self.socket_path)

    def _remove_socket(self) -> None:
        try:
            st = os.lstat(self.socket_path)
        except FileNotFoundError:
            return
        if stat.S_ISSOCK(st.st_mode) and (self._socket_ino is None or st.st_ino == self._socket_ino):
            try:
                os.unlink(self.socket_path)
            except FileNotFoundError:
                pass

    def run(self) -> str:
        """Install the signal handlers, serve, stop gracefully; the reason it stopped."""
        previous = install_wakeup_signals(self._wake_w)
        try:
            self.start()
            reason = self.wait_for_stop()
            self.stop(reason)
            return reason
        finally:
            restore_signals(previous)
            os.close(self._wake_r)
            os.close(self._wake_w)


_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def _ignore(signum: int, frame: Any) -> None:
    """The Python-level handler does nothing: the signal number already went into the wake-up pipe."""


SavedSignals = tuple[int, dict[signal.Signals, Any]]


def install_wakeup_signals(wake_fd: int) -> SavedSignals:
    """Route SIGTERM/SIGINT into ``wake_fd`` (main thread only). Returns what to restore."""
    old_fd = signal.set_wakeup_fd(wake_fd, warn_on_full_buffer=False)
    old: dict[signal.Signals, Any] = {sig: signal.signal(sig, _ignore) for sig in _STOP_SIGNALS}
    return old_fd, old


def restore_signals(previous: SavedSignals) -> None:
    old_fd, old = previous
    for sig, handler in old.items():
        signal.signal(sig, handler)
    signal.set_wakeup_fd(old_fd)


def serve(*, socket_dir: str, settings: SidecarSettings, stream: IO[str] | None = None,
          transport: str = DEFAULT_TRANSPORT) -> int:
    """Serve on ``<socket_dir>/<settings.name>.sock`` until stopped; the process exit status."""
    log = logfmt.JsonLog(stream or sys.stderr)
    path = os.path.join(socket_dir, f"{settings.name}.sock")
    server = HookServer(path, settings, log=log, transport=transport)
    try:
        server.run()
    except SocketInUse as exc:
        log.emit("error", error=str(exc), socket=path)
        return 1
    return 0
