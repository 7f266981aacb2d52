"""The asyncio I/O of the gossip layer: one UDP endpoint and one TCP server on the same
``addr:port`` (memberlist's NetTransport; 7946 by default), plus TCP client exchanges.

Why this shape (STYLE.md, "What a Python overlay control plane should absorb", item 4): the
driver talks to a ``Transport`` Protocol, so a test or a simulator can stand in for sockets.
This module holds no protocol logic; it only turns bytes into messages and back, and it is
the place where hostile input stops:

- Every datagram or stream that is malformed, undecryptable, oversized or too slow is dropped
  and counted in ``metrics`` under ``drop_packet_<reason>`` / ``drop_stream_<reason>``, the
  reasons being ``messages.DECODE_REASONS`` plus ``timeout``, ``busy`` and ``io``. Nothing a
  peer sends can raise out of a callback into the event loop.
- A stream read is bounded in size (``stream_bytes_max``, checked incrementally by
  ``StreamDecoder``) and in time (one whole-connection deadline, as memberlist's
  ``TCPTimeout``), and at most ``streams_max`` inbound streams run at once (memberlist allows
  128 concurrent push-pulls), so a slow or endless peer costs a bounded amount of memory.
- A handler (the driver) that raises is a bug of ours, not of the peer: it is logged with its
  traceback and counted as ``handler_errors``, and the loop keeps running.

Inbound UDP is decoded here (with the shared keyring, so key changes apply at once); outbound
UDP is bytes, encoded by the driver, which knows each peer's CRC capability. Streams are
encoded and decoded here in both directions.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Callable
from typing import Protocol

from swarmnet.gossip.keyring import Keyring
from swarmnet.gossip.messages import DecodeError, Err, Message
from swarmnet.gossip.wire import (
    STREAM_BYTES_MAX,
    UDP_RECEIVE_BYTES,
    StreamDecoder,
    decode_packet_parts,
    encode_stream,
)

log = logging.getLogger(__name__)

Addr = tuple[str, int]
PacketHandler = Callable[[list[Message], Addr], None]
"""Called on the loop thread with the good messages of one datagram and its source."""
StreamHandler = Callable[[Message, Addr], Message | None]
"""Called on the loop thread with the first message of an inbound stream; the reply (if any)
is written back before the connection closes. Must not block."""

STREAMS_MAX = 128  # memberlist maxPushPullRequests: concurrent inbound streams
READ_CHUNK_BYTES = 65536
_BIND_ATTEMPTS = 50  # port 0: TCP picks a port, UDP may find it taken; try another


class StreamFailed(Exception):
    """An outbound exchange that did not produce a message. ``reason`` is the metric label
    (a decode reason, ``timeout``, ``connect``, ``io`` or ``remote_error``)."""

    def __init__(self, reason: str, detail: str = ""):
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}" if detail else reason)


class Transport(Protocol):
    """What the driver needs from the network (memberlist's Transport, asyncio-shaped)."""

    metrics: dict[str, int]

    @property
    def local_addr(self) -> Addr:
        """The bound ``(ip, port)`` (the port is the real one when 0 was asked for)."""
        ...

    def send_packet(self, buf: bytes, addr: Addr) -> float:
        """Send one datagram; returns the loop time it was handed to the kernel."""
        ...

    async def exchange(
        self, addr: Addr, msg: Message, timeout_s: float, *, expect_reply: bool = True
    ) -> Message | None:
        """Open a stream, send ``msg``, read one message back (None if none is expected).
        Raises ``StreamFailed`` (already counted) on any failure."""
        ...

    async def close(self) -> None: ...


class _Udp(asyncio.DatagramProtocol):
    def __init__(self, owner: AsyncioTransport):
        self._owner = owner

    def datagram_received(self, data: bytes, addr: tuple) -> None:  # type: ignore[override]
        self._owner._on_datagram(data, (addr[0], addr[1]))

    def error_received(self, exc: Exception) -> None:
        # ICMP port unreachable from a dead peer lands here on Linux; it is normal during
        # failure detection, so it is a counter, not a log line.
        self._owner._count("udp_errors")


class AsyncioTransport:
    """UDP + TCP on one address. Create with ``await AsyncioTransport.bind(...)``."""

    def __init__(
        self,
        keyring: Keyring,
        on_packet: PacketHandler,
        on_stream: StreamHandler,
        *,
        stream_timeout_s: float,
        stream_bytes_max: int = STREAM_BYTES_MAX,
        streams_max: int = STREAMS_MAX,
        compress_streams: bool = False,
    ):
        self.keyring = keyring
        self.metrics: dict[str, int] = {}
        self._on_packet = on_packet
        self._on_stream = on_stream
        self._stream_timeout_s = stream_timeout_s
        self._stream_bytes_max = stream_bytes_max
        self._streams_max = streams_max
        # serf always compresses streams; LZW in Python costs CPU and serf reads plain
        # streams, so it is off by default.
        self._compress = compress_streams
        self._udp: asyncio.DatagramTransport | None = None
        self._server: asyncio.Server | None = None
        self._addr: Addr = ("", 0)
        self._active_streams = 0
        self._tasks: set[asyncio.Task] = set()
        self._closed = False

    @classmethod
    async def bind(
        cls,
        host: str,
        port: int,
        keyring: Keyring,
        on_packet: PacketHandler,
        on_stream: StreamHandler,
        **kwargs: object,
    ) -> AsyncioTransport:
        """Bind TCP and UDP on ``host:port``; with port 0, one free port for both."""
        self = cls(keyring, on_packet, on_stream, **kwargs)  # type: ignore[arg-type]
        await self._bind(host, port)
        return self

    async def _bind(self, host: str, port: int) -> None:
        loop = asyncio.get_running_loop()
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        for _ in range(_BIND_ATTEMPTS):
            server = await asyncio.start_server(
                self._serve, host, port, family=family, reuse_address=True
            )
            actual = server.sockets[0].getsockname()[1]
            try:
                udp, _ = await loop.create_datagram_endpoint(
                    lambda: _Udp(self), local_addr=(host, actual), family=family
                )
            except OSError:
                server.close()
                await server.wait_closed()
                if port:
                    raise
                continue
            self._server, self._udp = server, udp  # type: ignore[assignment]
            self._addr = (host, actual)
            return
        raise OSError(f"no port free for both TCP and UDP on {host}")

    @property
    def local_addr(self) -> Addr:
        return self._addr

    def _count(self, name: str, n: int = 1) -> None:
        self.metrics[name] = self.metrics.get(name, 0) + n

    # ---- UDP ------------------------------------------------------------------------------

    def send_packet(self, buf: bytes, addr: Addr) -> float:
        now = asyncio.get_running_loop().time()
        if self._udp is None or self._closed:
            self._count("drop_send_closed")
            return now
        try:
            self._udp.sendto(buf, addr)
        except (OSError, ValueError):
            self._count("udp_errors")
            return now
        self._count("packets_out")
        return now

    def _on_datagram(self, data: bytes, src: Addr) -> None:
        self._count("packets_in")
        if len(data) > UDP_RECEIVE_BYTES:  # cannot happen on IPv4; guards jumbograms
            self._count("drop_packet_oversized")
            return
        msgs, errors = decode_packet_parts(data, keyring=self.keyring)
        for err in errors:
            self._count("drop_packet_" + err.reason)
        if not msgs:
            return
        try:
            self._on_packet(msgs, src)
        except Exception:
            self._count("handler_errors")
            log.exception("gossip packet handler failed on a packet from %s", src)

    # ---- TCP server -----------------------------------------------------------------------

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer_info = writer.get_extra_info("peername") or ("", 0)
        peer: Addr = (peer_info[0], peer_info[1])
        if self._active_streams >= self._streams_max or self._closed:
            self._count("drop_stream_busy")
            writer.close()
            return
        self._active_streams += 1
        self._count("streams_in")
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        try:
            async with asyncio.timeout(self._stream_timeout_s):
                try:
                    msg = await self._read_message(reader)
                except DecodeError as exc:
                    self._count("drop_stream_" + exc.reason)
                    # memberlist answers an unreadable stream with errResp (net.go).
                    await self._write(writer, Err(f"failed to read stream: {exc.reason}"))
                    return
                try:
                    reply = self._on_stream(msg, peer)
                except Exception:
                    self._count("handler_errors")
                    log.exception("gossip stream handler failed on a stream from %s", peer)
                    return
                if reply is not None:
                    await self._write(writer, reply)
        except TimeoutError:
            self._count("drop_stream_timeout")
        except (OSError, EOFError, asyncio.IncompleteReadError):
            self._count("drop_stream_io")
        finally:
            self._active_streams -= 1
            if task is not None:
                self._tasks.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _read_message(self, reader: asyncio.StreamReader) -> Message:
        """Read until one whole message is decoded (memberlist never half-closes, so the
        decoder, not EOF, says when the initiator is done)."""
        decoder = StreamDecoder(self.keyring, max_bytes=self._stream_bytes_max)
        while True:
            data = await reader.read(READ_CHUNK_BYTES)
            if not data:
                return decoder.eof()
            msg = decoder.feed(data)
            if msg is not None:
                return msg

    async def _write(self, writer: asyncio.StreamWriter, msg: Message) -> None:
        writer.write(encode_stream(msg, compress=self._compress, keyring=self.keyring))
        await writer.drain()

    # ---- TCP client -----------------------------------------------------------------------

    async def exchange(
        self, addr: Addr, msg: Message, timeout_s: float, *, expect_reply: bool = True
    ) -> Message | None:
        self._count("streams_out")
        writer: asyncio.StreamWriter | None = None
        try:
            async with asyncio.timeout(timeout_s):
                try:
                    reader, writer = await asyncio.open_connection(addr[0], addr[1])
                except OSError as exc:
                    raise StreamFailed("connect", str(exc)) from None
                await self._write(writer, msg)
                if not expect_reply:
                    return None
                reply = await self._read_message(reader)
        except StreamFailed as exc:
            self._count("stream_failed_" + exc.reason)
            raise
        except DecodeError as exc:
            self._count("drop_stream_" + exc.reason)
            raise StreamFailed(exc.reason, exc.detail) from None
        except TimeoutError:
            self._count("stream_failed_timeout")
            raise StreamFailed("timeout") from None
        except (OSError, EOFError, asyncio.IncompleteReadError) as exc:
            self._count("stream_failed_io")
            raise StreamFailed("io", str(exc)) from None
        finally:
            if writer is not None:
                writer.close()
                with contextlib.suppress(Exception):
                    await writer.wait_closed()
        if isinstance(reply, Err):
            self._count("stream_failed_remote_error")
            raise StreamFailed("remote_error", reply.error)
        return reply

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._udp is not None:
            self._udp.close()
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2.0)


__all__ = [
    "STREAMS_MAX",
    "AsyncioTransport",
    "PacketHandler",
    "StreamFailed",
    "StreamHandler",
    "Transport",
]
