"""Move bytes between a TLS connection and a pair of local file descriptors, in one thread.

The migration's data path: on the source, rsync's remote-shell program (:mod:`connector`) joins
rsync's pipes to the TLS connection; on the target, the agent joins the connection to the pipes of
the ``rsync --server`` it runs. OpenSSL's objects must not be used by two threads at once, so the
TLS state lives in an :class:`ssl.SSLObject` over memory buffers and one loop (``selectors``) moves
everything: socket -> decrypt -> ``out_fd``, ``in_fd`` -> encrypt -> socket, never blocking on
one side while the other has work. Each direction buffers at most :data:`HIGH_WATER` bytes before it
stops reading (backpressure). Records are decrypted straight into one preallocated buffer
(:class:`OutBuffer`), and a full pipe to rsync is written again after a short sleep
(:func:`pipe_backoff`) rather than for every 16 KiB rsync reads.

Why not an :class:`ssl.SSLSocket` (no memory-buffer copies): OpenSSL then reads the socket itself, two
reads per record, and measured no cheaper here (the decrypting side dearer); and its ``close_notify`` (``SSL_shutdown``) reads on
from the socket and drops the peer's records that arrive meanwhile, which no check beforehand can
rule out (over memory buffers nothing arrives that the loop did not put there).

End of stream: when ``in_fd`` ends and the peer's records that arrived are decrypted, the loop
sends TLS ``close_notify`` and shuts the socket's write side (TLS 1.3 half-close); when the peer's ``close_notify`` arrives, ``out_fd`` is closed.
The loop ends when both directions are done. A TCP end without ``close_notify`` (a truncation) is
an error (:class:`BridgeError`), never a clean end.
"""

from __future__ import annotations

import os
import selectors
import socket
import ssl
import time
from collections import deque
from itertools import islice
from typing import cast

CHUNK = 1 << 20
RECORD = 16384  # the most plaintext one TLS record holds: what one SSL read returns at most
HIGH_WATER = 4 << 20
OUT_BUFFER = HIGH_WATER  # decrypted bytes held for out_fd at most
COMPACT_AT = 256 << 10  # OutBuffer moves at most this much to the front to make room
WRITEV_CHUNKS = 64
DRAIN_READS = 16  # reads per readiness event before the loop turns again
PIPE_SIZE = 1 << 20  # asked for the pipes to and from rsync (F_SETPIPE_SZ; best effort)
HANDSHAKE_TIMEOUT = 20.0
LINGER = 10.0  # "local": how long our side waits for the peer's end after its own
# A full pipe to rsync is written again after a short sleep instead of at its first free byte:
# rsync reads 16 KiB at a time, and waking for each read cost a loop turn, a wakeup and a short
# write (~16 000 per GiB, the chain's pace all the way back to the source). The sleep is the time
# rsync needs for half the pipe at DRAIN_RATE (so it never runs dry), at most MAX_BACKOFF.
DRAIN_RATE = 2 << 30  # bytes/s: faster than rsync takes data on any node we know of
MAX_BACKOFF = 0.0005
MIN_BACKOFF = 0.00005  # below this (a small pipe) a sleep saves nothing: wait for writability


class BridgeError(Exception):
    """The connection failed (the message says how)."""


class ByteQueue:
    """Bytes waiting to be written, as a queue of chunks: a partial write drops what was written in
    O(1) (a pipe takes 64 KiB at a time: shifting a 4 MiB buffer for each write would copy it 64
    times over), and up to :data:`WRITEV_CHUNKS` chunks go out in one ``writev``."""

    def __init__(self, first: bytes = b"") -> None:
        self._chunks: deque[memoryview] = deque()
        self._size = 0
        if first:
            self.push(first)

    def __len__(self) -> int:
        return self._size

    def __bool__(self) -> bool:
        return self._size > 0

    def push(self, data: bytes) -> None:
        if data:
            self._chunks.append(memoryview(data))
            self._size += len(data)

    def head(self) -> list[memoryview]:
        return list(islice(self._chunks, WRITEV_CHUNKS))

    def consume(self, n: int) -> None:
        self._size -= n
        while n:
            first = self._chunks[0]
            if len(first) <= n:
                n -= len(first)
                self._chunks.popleft()
            else:
                self._chunks[0] = first[n:]
                n = 0


class OutBuffer:
    """Decrypted bytes waiting for ``out_fd``: one preallocated buffer that TLS decrypts into
    (``SSLObject.read(n, buffer)``) and the pipe is written from, so no record costs an allocation
    (a 16 KiB ``bytes`` per record made the agent fault fresh pages in: about 8% of its CPU).
    ``start:end`` holds the bytes; :meth:`room` makes space at the end by moving a small rest to the
    front (at most :data:`COMPACT_AT` bytes moved for every ``OUT_BUFFER - COMPACT_AT`` taken)."""

    def __init__(self, first: bytes = b"") -> None:
        self.buf = bytearray(max(OUT_BUFFER, len(first) + RECORD))
        self.view = memoryview(self.buf)
        self.start = 0
        self.end = len(first)
        self.buf[:self.end] = first

    def __len__(self) -> int:
        return self.end - self.start

    def __bool__(self) -> bool:
        return self.end > self.start

    def room(self) -> bool:
        """Whether a whole record fits at the end (after moving a small rest to the front)."""
        if len(self.buf) - self.end >= RECORD:
            return True
        held = self.end - self.start
        if held > COMPACT_AT:
            return False  # wait until out_fd takes more
        self.buf[:held] = self.view[self.start:self.end]
        self.start, self.end = 0, held
        return True

    def tail(self) -> memoryview:
        return self.view[self.end:self.end + RECORD]

    def head(self) -> memoryview:
        return self.view[self.start:self.end]

    def consume(self, n: int) -> None:
        self.start += n
        if self.start == self.end:
            self.start = self.end = 0

    def clear(self) -> None:
        self.start = self.end = 0


class TlsChannel:
    """An :class:`ssl.SSLObject` over a connected non-blocking socket."""

    def __init__(self, sock: socket.socket, context: ssl.SSLContext, *, server_side: bool,
                 server_hostname: str | None = None) -> None:
        self.sock = sock
        self.incoming = ssl.MemoryBIO()
        self.outgoing = ssl.MemoryBIO()
        self.obj = context.wrap_bio(self.incoming, self.outgoing, server_side=server_side,
                                    server_hostname=server_hostname)
        self.eof_received = False  # the peer's close_notify
        self.tcp_eof = False

    # --- blocking helpers (handshake, header lines) ---------------------------------------------
    def _flush_blocking(self, deadline: float) -> None:
        data = self.outgoing.read()
        view = memoryview(data)
        while view:
            self._wait(selectors.EVENT_WRITE, deadline)
            try:
                n = self.sock.send(view)
            except (BlockingIOError, InterruptedError):
                continue
            view = view[n:]

    def _wait(self, events: int, deadline: float) -> None:
        left = deadline - time.monotonic()
        if left <= 0:
            raise BridgeError("timed out")
        with selectors.DefaultSelector() as sel:
            sel.register(self.sock, events)
            if not sel.select(left):
                raise BridgeError("timed out")

    def _fill_blocking(self, deadline: float) -> None:
        self._wait(selectors.EVENT_READ, deadline)
        try:
            data = self.sock.recv(CHUNK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            raise BridgeError(f"connection failed: {exc.strerror or exc}") from None
        if not data:
            self.tcp_eof = True
            self.incoming.write_eof()
            raise BridgeError("the peer closed the connection")
        self.incoming.write(data)

    def handshake(self, timeout: float = HANDSHAKE_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.obj.do_handshake()
                self._flush_blocking(deadline)
                return
            except ssl.SSLWantReadError:
                self._flush_blocking(deadline)
                self._fill_blocking(deadline)
            except ssl.SSLError as exc:
                try:
                    self._flush_blocking(deadline)  # our alert, so the peer learns why
                except (BridgeError, OSError):
                    pass
                raise BridgeError(f"TLS handshake failed: {exc.reason or exc}") from None

    def send_all(self, data: bytes, timeout: float = HANDSHAKE_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        self.obj.write(data)
        self._flush_blocking(deadline)

    def read_line(self, limit: int, timeout: float = HANDSHAKE_TIMEOUT) -> tuple[bytes, bytes]:
        """One line (without its newline, at most ``limit`` bytes) and what followed it."""
        deadline = time.monotonic() + timeout
        got = bytearray()
        while True:
            try:
                chunk = self.obj.read(CHUNK)
            except ssl.SSLWantReadError:
                self._fill_blocking(deadline)
                continue
            except ssl.SSLZeroReturnError:
                raise BridgeError("the peer ended the connection before a complete line") from None
            except ssl.SSLError as exc:
                raise BridgeError(f"TLS failed: {exc.reason or exc}") from None
            if not chunk:
                raise BridgeError("the peer ended the connection before a complete line")
            got += chunk
            end = got.find(b"\n")
            if end >= 0:
                if end > limit:
                    raise BridgeError(f"the line is longer than {limit} bytes")
                return bytes(got[:end]), bytes(got[end + 1:])
            if len(got) > limit:
                raise BridgeError(f"the line is longer than {limit} bytes")


def pump(channel: TlsChannel, in_fd: int, out_fd: int, *, until: str, early: bytes = b"",
         idle_timeout: float | None = None) -> None:
    """Move bytes until the stream is over (see the module doc) and return. ``until``: ``"peer"``
    (rsync's client side, as ssh does: over when the peer's stream ended and all of it is written
    to ``out_fd``; the client rsync waits for its remote shell to exit before it closes its own
    end) or ``"local"`` (the server side: over when ``in_fd`` ended, i.e. ``rsync --server``
    exited, and everything is sent with ``close_notify``; it then waits up to :data:`LINGER` for
    the peer's end before it returns). ``early``: bytes already decrypted (read
    with the header line) that go to ``out_fd`` first. Closes ``out_fd``; ``in_fd`` is left to the
    caller. Raises :class:`BridgeError`."""
    _Pump(channel, in_fd, out_fd, until=until, early=early).run(idle_timeout)


class _Pump:
    """One connection's loop. I/O is eager: what was read is passed on at once, and a descriptor is
    watched for writability only while a write would block (no selector churn per chunk)."""

    def __init__(self, channel: TlsChannel, in_fd: int, out_fd: int, *, until: str, early: bytes) -> None:
        if until not in ("peer", "local"):
            raise ValueError(f"until must be 'peer' or 'local', not {until!r}")
        self.ch = channel
        self.sock = channel.sock
        self.obj = channel.obj
        self.in_fd, self.out_fd, self.until = in_fd, out_fd, until
        self.to_out = OutBuffer(early)
        self.to_net = ByteQueue()
        self.in_open = True  # in_fd still gives data
        self.net_open = True  # the peer still sends
        self.out_closed = False
        self.shut_wr = False
        self.tcp_eof = False
        self.drained = False  # the last decrypt left nothing inside TLS
        self.linger_until: float | None = None  # "local": when to stop waiting for the peer's end
        self.discarding = False  # "local": the process stopped reading; the peer's bytes are dropped
        self.out_backoff = pipe_backoff(out_fd)
        self.sel = selectors.DefaultSelector()
        self.registered: dict[object, int] = {}
        self.buf = bytearray(CHUNK)  # reads land here (no allocation per read); TLS copies it at once
        self.view = memoryview(self.buf)

    # --- the selector ---------------------------------------------------------------------------
    def _want(self, target: object, events: int) -> None:
        had = self.registered.get(target, 0)
        if had == events:
            return
        if events == 0:
            self.sel.unregister(target)  # type: ignore[arg-type]
            del self.registered[target]
        elif had == 0:
            self.sel.register(target, events)  # type: ignore[arg-type]
            self.registered[target] = events
        else:
            self.sel.modify(target, events)  # type: ignore[arg-type]
            self.registered[target] = events

    def _arm(self) -> None:
        sock_events = 0
        if self.net_open and not self.tcp_eof and self.to_out.room():
            sock_events |= selectors.EVENT_READ
        if self.to_net:
            sock_events |= selectors.EVENT_WRITE
        self._want(self.sock, sock_events)
        self._want(self.in_fd, selectors.EVENT_READ
                   if self.in_open and len(self.to_net) < HIGH_WATER and not self.shut_wr else 0)
        self._want(self.out_fd, selectors.EVENT_WRITE if self.to_out and not self.out_closed else 0)

    # --- the four moves -------------------------------------------------------------------------
    def _decrypt(self) -> None:
        """Decrypt what TLS holds into :attr:`to_out`, a record at a time, while there is room."""
        self.drained = False
        out = self.to_out
        read = self.obj.read
        incoming = self.ch.incoming
        while out.room():
            if not incoming.pending and not self.tcp_eof and not self.obj.pending():
                self.drained = True  # nothing complete inside TLS: skip the SSLWantReadError
                return
            try:
                # straight into the buffer: no allocation per record (typeshed says bytes; with a
                # buffer it is the count)
                n = cast(int, read(RECORD, out.tail()))
            except ssl.SSLWantReadError:
                self.drained = True  # nothing left inside TLS either
                return
            except ssl.SSLZeroReturnError:
                self.net_open = False
                return
            except ssl.SSLError as exc:
                raise BridgeError(f"TLS failed: {exc.reason or exc}") from None
            if not n:
                self.net_open = False
                return
            if not self.discarding:
                out.end += n

    def _send(self) -> None:
        self.to_net.push(self.ch.outgoing.read())
        while self.to_net:
            try:
                n = self.sock.sendmsg(self.to_net.head())
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                raise BridgeError(f"sending failed: {exc.strerror or exc}") from None
            self.to_net.consume(n)

    def _write_out(self) -> None:
        out = self.to_out
        slept = False
        while out and not self.out_closed:
            try:
                n = os.write(self.out_fd, out.head())
            except (BlockingIOError, InterruptedError):
                if slept or not self.out_backoff:
                    return  # the selector says when there is room
                time.sleep(self.out_backoff)  # the pipe is full: let rsync take some
                slept = True
                continue
            except BrokenPipeError:
                if self.until == "peer":
                    raise BridgeError("the local end closed its input") from None
                self._stop_passing_in()
                return
            out.consume(n)
            if self.net_open and out.room():
                self._decrypt()

    def _stop_passing_in(self) -> None:
        """"local": the process stopped reading (``rsync --server`` exits, e.g. on a full disk,
        after writing why to its output). What the peer still sends is dropped from now on, so the
        process's last words go out with ``close_notify`` and the loop can wait for the peer's end:
        an error here would close the socket with the peer's bytes unread, and the reset that
        answers them throws those last words away on the peer before its rsync reads them."""
        self.discarding = True
        self.to_out.clear()
        self._want(self.out_fd, 0)
        os.close(self.out_fd)
        self.out_closed = True

    def _receive(self) -> None:
        """Take what the socket holds (a few reads: one per loop turn would cost more than the
        reading), decrypt it, pass it on."""
        got = False
        for _ in range(DRAIN_READS):
            try:
                n = self.sock.recv_into(self.buf)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                raise BridgeError(f"receiving failed: {exc.strerror or exc}") from None
            if not n:
                self.tcp_eof = True
                self.ch.incoming.write_eof()
                break
            self.ch.incoming.write(self.view[:n])
            got = True
            if self.ch.incoming.pending >= HIGH_WATER:
                break
        if got or self.tcp_eof:
            self._decrypt()
            self._send()  # TLS's own answers (key updates, tickets)

    def _check_cut(self) -> None:
        """The TCP stream ended and everything it brought is decrypted: without the peer's
        ``close_notify`` (and before our own end) that is a cut, never a clean end."""
        if self.tcp_eof and self.net_open and self.drained and not self.ch.incoming.pending:
            if not self.shut_wr:
                raise BridgeError("the connection ended without TLS close_notify (cut off)")
            self.net_open = False

    def _read_in(self) -> None:
        """Take what ``in_fd`` holds (a few reads), encrypt it, send it."""
        for _ in range(DRAIN_READS):
            try:
                n = os.readv(self.in_fd, [self.buf])
            except (BlockingIOError, InterruptedError):
                break
            if not n:
                self.in_open = False
                break
            try:
                self.obj.write(self.view[:n])
            except ssl.SSLError as exc:
                raise BridgeError(f"TLS failed: {exc.reason or exc}") from None
            if self.ch.outgoing.pending + len(self.to_net) >= HIGH_WATER:
                break
        self._send()

    def _finish_states(self) -> bool:
        """Close what is over; True when the stream is over for this side."""
        self._check_cut()
        if not self.net_open and not self.to_out and not self.out_closed:
            os.close(self.out_fd)
            self.out_closed = True
        if not self.in_open and not self.to_net and not self.shut_wr and self._nothing_in_flight():
            try:
                self.obj.unwrap()
            except (ssl.SSLWantReadError, ssl.SSLError):
                pass
            self._send()
            if not self.to_net:
                try:
                    self.sock.shutdown(socket.SHUT_WR)
                except OSError:
                    pass
                self.shut_wr = True
        if self.until == "peer" and self.out_closed:
            if not self.shut_wr:
                _goodbye(self.ch)
            return True
        if self.until == "local" and self.shut_wr:
            # Over once the peer has ended too (or stayed silent for LINGER): a socket closed
            # before the peer's close_notify is read would answer it with a reset, and a reset
            # throws away what the peer has not read yet of our stream.
            if self.linger_until is None:
                self.linger_until = time.monotonic() + LINGER
            return not self.net_open or time.monotonic() >= self.linger_until
        return False

    def _nothing_in_flight(self) -> bool:
        """True when the TLS object holds no undecrypted bytes. Our ``close_notify`` must wait for
        that: sending it (``SSL_shutdown``) makes OpenSSL read on for the peer's ``close_notify``
        and fail on (and drop) the application records it meets, so the rest of the peer's stream
        would be lost. A partial record is no harm: OpenSSL has taken it out of the buffer, and
        ``SSL_read`` goes on with it after the half-close."""
        if not self.net_open:
            return True  # the peer's close_notify is in: OpenSSL reads nothing more
        if self.ch.incoming.pending:
            self._decrypt()
        return not self.ch.incoming.pending

    def run(self, idle_timeout: float | None) -> None:
        os.set_blocking(self.in_fd, False)
        os.set_blocking(self.out_fd, False)
        try:
            self._decrypt()
            self._write_out()
            while not self._finish_states():
                self._arm()
                if not self.registered:
                    raise BridgeError("nothing left to wait for")  # never spin
                timeout = idle_timeout
                if self.linger_until is not None:
                    left = max(0.0, self.linger_until - time.monotonic())
                    timeout = left if timeout is None else min(timeout, left)
                events = self.sel.select(timeout)
                if not events:
                    if self.linger_until is not None:
                        continue  # _finish_states ends it
                    raise BridgeError(f"no data moved for {idle_timeout:.0f} s")
                for key, mask in events:
                    if key.fileobj is self.sock:
                        if mask & selectors.EVENT_WRITE:
                            self._send()
                        if mask & selectors.EVENT_READ:
                            self._receive()
                            self._write_out()
                    elif key.fileobj == self.in_fd:
                        self._read_in()
                    elif key.fileobj == self.out_fd:
                        self._write_out()
        finally:
            self.sel.close()
            if not self.out_closed:
                try:
                    os.close(self.out_fd)
                except OSError:
                    pass


def _goodbye(channel: TlsChannel) -> None:
    """Best effort: our ``close_notify`` and the socket's write side shut."""
    try:
        channel.obj.unwrap()
    except (ssl.SSLWantReadError, ssl.SSLError):
        pass
    try:
        data = channel.outgoing.read()
        if data:
            channel.sock.setblocking(True)
            channel.sock.settimeout(2.0)
            channel.sock.sendall(data)
        channel.sock.shutdown(socket.SHUT_WR)
    except OSError:
        pass


def pipe_backoff(fd: int) -> float:
    """How long to sleep when the pipe ``fd`` is full before writing again: the time its reader
    needs for half of it at :data:`DRAIN_RATE`, at most :data:`MAX_BACKOFF`; 0 (wait for
    writability) for a pipe too small for it to be worth it, or ``fd`` not a pipe (rsync gives its
    remote shell a socket)."""
    import fcntl

    try:
        size = fcntl.fcntl(fd, getattr(fcntl, "F_GETPIPE_SZ", 1032))
    except OSError:
        return 0.0
    seconds = min(MAX_BACKOFF, size / 2 / DRAIN_RATE)
    return seconds if seconds >= MIN_BACKOFF else 0.0


def widen_pipe(fd: int) -> None:
    """Ask for a :data:`PIPE_SIZE` pipe buffer (fewer, larger reads and writes); a socket or a
    refused size is left as it is."""
    import fcntl

    try:
        fcntl.fcntl(fd, getattr(fcntl, "F_SETPIPE_SZ", 1031), PIPE_SIZE)
    except OSError:
        pass
