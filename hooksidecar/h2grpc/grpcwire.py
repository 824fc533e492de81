"""gRPC's wire conventions on top of HTTP/2, pure: status codes, the length-prefixed message,
``grpc-message`` text and the headers of an answer. No sockets, no HTTP/2 state."""

from __future__ import annotations

import enum
from collections.abc import Callable

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


RESPONSE_HEADERS = [(b":status", b"200"), (b"content-type", b"application/grpc")]
