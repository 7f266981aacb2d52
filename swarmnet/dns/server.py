"""The embedded resolver's I/O: 127.0.0.11:53 (UDP and TCP) inside every task sandbox,
served from the agent's event loop, with unknown names forwarded to the host's resolvers.

One ``DnsServer`` per agent. For each sandbox, ``attach(netns, networks)`` opens the two
listening sockets INSIDE the sandbox's network namespace from a helper thread
(``nsutil.in_netns``: setns on that thread only, the socket keeps its namespace for life,
no fork: forked helpers killed the agent, see nsutil) and serves them from the loop.
``update(records)`` swaps the name table by one reference assignment, so every query sees
either the old or the new table, never a mix.

Forwarding. Unknown names go to the nameservers of ``/etc/resolv.conf`` as the AGENT sees
it (the agent's mount namespace), over a socket in the AGENT's network namespace (the
loop thread's), because that is where the host's resolvers are reachable; the sandbox has
only its overlay. Loopback nameservers (systemd-resolved's 127.0.0.53, Docker's own
127.0.0.11 when the agent itself runs in a container) are therefore kept: they are
reachable from the agent's namespace, and one that is not (a lab host namespace whose
resolv.conf is the machine's) fails at once with ECONNREFUSED/ENETUNREACH and the next is
tried. We never attach in the agent's own namespace, so forwarding cannot loop to us.
Docker tries each upstream for up to 4 s and sends NOTHING when all fail, so the client
hangs until its own timeout (ANCHORS: "the query hangs (2-30 s), no fast SERVFAIL"); here
the whole forward has one deadline (``forward_timeout_s``, 2 s), split over the upstreams
left, and ends in SERVFAIL, which clients treat as "try again later", not "no such name".

Malformed input never reaches the resolver's state: a query that does not parse gets
FORMERR when its 12-byte header can be read and is a query (QR clear), else it is dropped;
responses (QR set) are always dropped, so two resolvers can never ping-pong.

Known limitation: we bind 127.0.0.11:53 itself, so a task that binds 0.0.0.0:53 (its own
DNS server) conflicts with us. Docker binds a random port and DNATs 127.0.0.11:53 to it
with nftables in the sandbox; ``DnsConfig.port`` allows the same later.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import random
import socket
import struct
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field

import dns.exception
import dns.flags
import dns.message
import dns.opcode
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset

from swarmnet.dns.records import Rcode, Records, resolve
from swarmnet.kernel import nsutil

log = logging.getLogger(__name__)

HEADER_BYTES = 12  # RFC 1035 4.1.1
UDP_CLASSIC_BYTES = 512  # RFC 1035 4.2.1: the reply size without EDNS
_QR = 0x8000
_OPCODE_MASK = 0x7800
_RD = 0x0100


@dataclass(frozen=True)
class DnsConfig:
    listen_addr: str = "127.0.0.11"
    """Where sandboxes' resolv.conf points (Docker's address; on lo, 127/8 is all local)."""

    port: int = 53

    resolv_conf: str = "/etc/resolv.conf"
    """The host's resolvers, read in the agent's mount namespace; re-read when it changes."""

    upstreams: tuple[tuple[str, int], ...] | None = None
    """Explicit (ip, port) upstreams instead of ``resolv_conf`` (tests, or an operator)."""

    upstreams_max: int = 3  # glibc's MAXNS and Docker's maxExtDNS

    forward_timeout_s: float = 2.0
    """One deadline for the whole forward, then SERVFAIL. Below glibc's 5 s per-try timeout
    so the client gets our SERVFAIL rather than its own timeout."""

    forwards_inflight_max: int = 1024  # Docker's maxConcurrent; beyond it: SERVFAIL at once

    udp_payload_bytes: int = 1232
    """Our EDNS payload (DNS flag day 2020): replies larger than this go truncated (TC) over
    UDP and the client retries over TCP."""

    query_bytes_max: int = 4096
    """A query is one question (<= ~300 bytes with EDNS options); anything larger is
    dropped (UDP) or ends the connection (TCP) before it is parsed."""

    tcp_idle_s: float = 10.0  # an idle TCP client is closed (RFC 7766 suggests seconds)
    tcp_conns_max: int = 32  # per sandbox: a task cannot exhaust the agent's descriptors

    resolv_check_s: float = 5.0  # how often resolv.conf's mtime is looked at


@dataclass
class DnsCounters:
    """Each query ends in exactly one of the outcomes below, so when nothing is in flight
    ``queries == answered + nxdomain + forwarded + servfail + formerr + notimp + dropped``."""

    queries: int = 0
    answered: int = 0  # NOERROR from our table (with or without records)
    nxdomain: int = 0  # NXDOMAIN from our table
    forwarded: int = 0  # an upstream's reply relayed (whatever its rcode)
    servfail: int = 0  # ours: no upstream answered in time, overload, internal error
    formerr: int = 0
    notimp: int = 0  # an opcode other than QUERY
    dropped: int = 0  # not answerable (no header, a response, oversize)

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def parse_resolv_conf(text: str, limit: int = 3) -> list[tuple[str, int]]:
    """``nameserver`` lines as (ip, 53), in order, deduplicated, at most ``limit``."""
    out: list[tuple[str, int]] = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) < 2 or parts[0] != "nameserver":
            continue
        try:
            ip = str(ipaddress.ip_address(parts[1]))
        except ValueError:
            continue
        if (ip, 53) not in out:
            out.append((ip, 53))
        if len(out) >= limit:
            break
    return out


def formerr_for(data: bytes) -> bytes | None:
    """FORMERR for an unparseable message whose header is readable and is a query; None
    (drop) otherwise. Built by hand: the message is, by definition, not parseable."""
    if len(data) < HEADER_BYTES:
        return None
    qid, flags = struct.unpack("!HH", data[:4])
    if flags & _QR:
        return None
    flags = _QR | (flags & _OPCODE_MASK) | (flags & _RD) | dns.rcode.FORMERR
    return struct.pack("!HHHHHH", qid, flags, 0, 0, 0, 0)


class _BadReply(Exception):
    """An upstream answered something that is not the reply to our question."""


@dataclass
class _Sandbox:
    netns: str
    networks: tuple[str, ...]
    udp: asyncio.DatagramTransport | None = None
    tcp: asyncio.AbstractServer | None = None
    tcp_conns: set[asyncio.StreamWriter] = field(default_factory=set)
    closed: bool = False


class _UdpServer(asyncio.DatagramProtocol):
    def __init__(self, server: DnsServer, sb: _Sandbox):
        self._server = server
        self._sb = sb

    def datagram_received(self, data: bytes, addr: tuple) -> None:
        self._server._on_udp(self._sb, data, addr)

    def error_received(self, exc: Exception) -> None:
        pass  # an ICMP error about a reply to a client that went away: nothing to do


class _UpstreamUdp(asyncio.DatagramProtocol):
    """One forwarded query over UDP: resolves ``fut`` with the first datagram carrying our
    id and QR set (anything else, e.g. a late reply to an earlier query, is ignored)."""

    def __init__(self, fut: asyncio.Future[bytes], qid: int):
        self._fut = fut
        self._qid = qid

    def datagram_received(self, data: bytes, addr: tuple) -> None:
        if len(data) < HEADER_BYTES or self._fut.done():
            return
        qid, flags = struct.unpack("!HH", data[:4])
        if qid == self._qid and flags & _QR:
            self._fut.set_result(data)

    def error_received(self, exc: Exception) -> None:
        if not self._fut.done():  # ECONNREFUSED from ICMP port unreachable: fail fast
            self._fut.set_exception(exc)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self._fut.done():
            self._fut.set_exception(exc or ConnectionError("upstream socket closed"))


class DnsServer:
    """The agent's embedded resolver (see the module docstring). All methods run on the
    agent's loop; ``attach``/``close`` are coroutines, the rest are plain calls."""

    def __init__(self, records: Records | None = None, config: DnsConfig | None = None):
        self.config = config or DnsConfig()
        self.counters = DnsCounters()
        self._records = records or Records()
        self._sandboxes: dict[str, _Sandbox] = {}
        # One thread does every setns: it is the only thread whose namespace ever changes,
        # and in_netns puts it back before it returns.
        self._nsx = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dns-netns")
        self._rng = random.SystemRandom()  # query ids to upstreams must be unguessable
        self._tasks: set[asyncio.Task] = set()
        self._inflight = 0
        self._upstreams: list[tuple[str, int]] = list(self.config.upstreams or ())
        self._resolv_mtime: float | None = None
        self._resolv_checked = float("-inf")

    # ---- the table and the sandboxes -----------------------------------------------

    def update(self, records: Records) -> None:
        """Swap the name table (atomic: one reference)."""
        self._records = records

    @property
    def records(self) -> Records:
        return self._records

    def sandboxes(self) -> dict[str, tuple[str, ...]]:
        return {n: sb.networks for n, sb in self._sandboxes.items()}

    def set_networks(self, netns: str, asker_networks: Sequence[str]) -> None:
        """Change the networks an attached sandbox asks from (ordered, first = primary)."""
        sb = self._sandboxes.get(netns)
        if sb is not None:
            sb.networks = tuple(asker_networks)

    async def attach(self, netns: str, asker_networks: Sequence[str]) -> None:
        """Serve 127.0.0.11:53 in ``netns`` (its lo must be up). Idempotent: attaching an
        attached sandbox only updates its networks. Raises OSError when the sockets cannot
        be opened (no such namespace, lo down, the port taken)."""
        sb = self._sandboxes.get(netns)
        if sb is not None:
            sb.networks = tuple(asker_networks)
            return
        sb = _Sandbox(netns=netns, networks=tuple(asker_networks))
        self._sandboxes[netns] = sb  # before the first await: a concurrent attach is a no-op
        loop = asyncio.get_running_loop()
        try:
            udp_sock, tcp_sock = await loop.run_in_executor(self._nsx, self._open_sockets, netns)
        except BaseException:
            if self._sandboxes.get(netns) is sb:
                del self._sandboxes[netns]
            raise
        try:
            transport, _ = await loop.create_datagram_endpoint(
                lambda: _UdpServer(self, sb), sock=udp_sock
            )
            sb.udp = transport
            sb.tcp = await asyncio.start_server(
                lambda r, w: self._tcp_client(sb, r, w), sock=tcp_sock
            )
        except BaseException:
            self._close_sandbox(sb)
            udp_sock.close()
            tcp_sock.close()
            if self._sandboxes.get(netns) is sb:
                del self._sandboxes[netns]
            raise
        if sb.closed:  # detached while we were opening
            self._close_sandbox(sb)

    def detach(self, netns: str) -> bool:
        """Stop serving ``netns`` and close its sockets now. False if it was not attached."""
        sb = self._sandboxes.pop(netns, None)
        if sb is None:
            return False
        self._close_sandbox(sb)
        return True

    async def close(self) -> None:
        for netns in list(self._sandboxes):
            self.detach(netns)
        for t in list(self._tasks):
            t.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        self._nsx.shutdown(wait=False)

    def _open_sockets(self, netns: str) -> tuple[socket.socket, socket.socket]:
        """On the netns thread: both listening sockets, created inside ``netns``."""
        addr = (self.config.listen_addr, self.config.port)
        with nsutil.in_netns(netns):
            udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            udp.bind(addr)
            tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # restart: TIME_WAIT
            tcp.bind(addr)
            tcp.listen(64)
            udp.setblocking(False)
            tcp.setblocking(False)
        except BaseException:
            udp.close()
            tcp.close()
            raise
        return udp, tcp

    def _close_sandbox(self, sb: _Sandbox) -> None:
        sb.closed = True
        if sb.udp is not None:
            sb.udp.close()
        if sb.tcp is not None:
            sb.tcp.close()  # the listening socket; established connections follow:
        for w in list(sb.tcp_conns):
            w.close()

    # ---- queries ----------------------------------------------------------------------

    def _on_udp(self, sb: _Sandbox, data: bytes, addr: tuple) -> None:
        local, query = self._local(data, sb.networks, tcp=False)
        if query is None:
            if local is not None and sb.udp is not None and not sb.udp.is_closing():
                sb.udp.sendto(local, addr)
            return

        async def forward() -> None:
            reply = await self._forward(query, data, tcp=False)
            if sb.udp is not None and not sb.udp.is_closing():
                sb.udp.sendto(reply, addr)

        self._spawn(forward())

    async def _tcp_client(
        self, sb: _Sandbox, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        if sb.closed or len(sb.tcp_conns) >= self.config.tcp_conns_max:
            writer.close()
            return
        sb.tcp_conns.add(writer)
        try:
            while not sb.closed:
                # One query per read, answered before the next is read: a client cannot
                # make us buffer more than one query (RFC 7766 allows serial processing).
                head = await asyncio.wait_for(reader.readexactly(2), self.config.tcp_idle_s)
                (n,) = struct.unpack("!H", head)
                if n > self.config.query_bytes_max:
                    self.counters.queries += 1
                    self.counters.dropped += 1
                    break  # the framing cannot be trusted any more
                data = await asyncio.wait_for(reader.readexactly(n), self.config.tcp_idle_s)
                local, query = self._local(data, sb.networks, tcp=True)
                reply = local if query is None else await self._forward(query, data, tcp=True)
                if reply is None:
                    continue
                writer.write(struct.pack("!H", len(reply)) + reply)
                await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, ConnectionError, OSError):
            pass
        finally:
            sb.tcp_conns.discard(writer)
            writer.close()

    def _local(
        self, data: bytes, networks: Sequence[str], *, tcp: bool
    ) -> tuple[bytes | None, dns.message.Message | None]:
        """Answer from the table. Returns (reply, None), (None, None) to drop, or
        (None, query) when the query must be forwarded. Never raises."""
        c = self.counters
        c.queries += 1
        if len(data) > self.config.query_bytes_max:
            c.dropped += 1
            return None, None
        try:
            q = dns.message.from_wire(data)
        except Exception:  # any parse error: dnspython raises many types
            reply = formerr_for(data)
            if reply is None:
                c.dropped += 1
            else:
                c.formerr += 1
            return reply, None
        try:
            if q.flags & dns.flags.QR:
                c.dropped += 1
                return None, None
            if q.opcode() != dns.opcode.QUERY:
                c.notimp += 1
                return self._reply(q, dns.rcode.NOTIMP, tcp=tcp), None
            if len(q.question) != 1:
                c.formerr += 1
                return self._reply(q, dns.rcode.FORMERR, tcp=tcp), None
            question = q.question[0]
            if question.rdclass != dns.rdataclass.IN:
                return None, q  # CHAOS and friends: not ours
            name = question.name.to_text(omit_final_dot=True)
            ans = resolve(self._records, name, int(question.rdtype), networks)
            if ans.rcode is Rcode.FORWARD:
                return None, q
            if ans.rcode is Rcode.NXDOMAIN:
                c.nxdomain += 1
                return self._reply(q, dns.rcode.NXDOMAIN, tcp=tcp, aa=True), None
            ips = list(ans.a_records)
            self._rng.shuffle(ips)  # round robin for dnsrr and tasks.X, as Docker does
            c.answered += 1
            return self._reply(q, dns.rcode.NOERROR, tcp=tcp, aa=True, ips=ips, ttl=ans.ttl), None
        except Exception:  # a bug must cost one query, never the resolver
            log.exception("dns: answering a query failed")
            c.servfail += 1
            return self._servfail(q, tcp=tcp), None

    def _reply(
        self,
        q: dns.message.Message,
        rcode: int,
        *,
        tcp: bool,
        aa: bool = False,
        ips: Sequence[str] = (),
        ttl: int = 0,
    ) -> bytes:
        resp = dns.message.make_response(
            q, recursion_available=True, our_payload=self.config.udp_payload_bytes
        )
        resp.set_rcode(rcode)
        if aa:
            resp.flags |= dns.flags.AA
        if ips:
            qname = q.question[0].name
            resp.answer.append(
                dns.rrset.from_text_list(qname, ttl, dns.rdataclass.IN, dns.rdatatype.A, ips)
            )
        return resp.to_wire(max_size=self._max_size(q, tcp), prefer_truncation=True)

    def _max_size(self, q: dns.message.Message, tcp: bool) -> int:
        if tcp:
            return 65535
        if q.edns >= 0:
            return max(UDP_CLASSIC_BYTES, min(q.payload, self.config.udp_payload_bytes))
        return UDP_CLASSIC_BYTES

    def _servfail(self, q: dns.message.Message, *, tcp: bool) -> bytes:
        try:
            return self._reply(q, dns.rcode.SERVFAIL, tcp=tcp)
        except Exception:  # cannot even build a reply: the bare header will do
            return struct.pack("!HHHHHH", q.id, _QR | (q.flags & _RD) | 2, 0, 0, 0, 0)

    # ---- forwarding -------------------------------------------------------------------

    def upstreams(self) -> list[tuple[str, int]]:
        """The upstream resolvers now (re-reading resolv.conf when it changed)."""
        if self.config.upstreams is not None:
            return list(self._upstreams)
        now = asyncio.get_running_loop().time()
        if now - self._resolv_checked >= self.config.resolv_check_s:
            self._resolv_checked = now
            try:
                mtime = os.stat(self.config.resolv_conf).st_mtime
                if mtime != self._resolv_mtime:
                    with open(self.config.resolv_conf, encoding="utf-8", errors="replace") as f:
                        self._upstreams = parse_resolv_conf(f.read(), self.config.upstreams_max)
                    self._resolv_mtime = mtime
            except OSError:
                self._upstreams = []
                self._resolv_mtime = None
        return list(self._upstreams)

    def _spawn(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _forward(self, q: dns.message.Message, data: bytes, *, tcp: bool) -> bytes:
        """The upstreams' reply to ``data`` with the client's id, or our SERVFAIL within
        ``forward_timeout_s``. Upstreams are tried in order; SERVFAIL/REFUSED from one
        moves on to the next (as Docker does), and the last such reply is relayed if no
        upstream does better. Never raises (except cancellation)."""
        c = self.counters
        if self._inflight >= self.config.forwards_inflight_max:
            c.servfail += 1
            return self._servfail(q, tcp=tcp)
        self._inflight += 1
        try:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + self.config.forward_timeout_s
            ups = self.upstreams()
            fallback: bytes | None = None
            for i, (host, port) in enumerate(ups):
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                qid = self._rng.randrange(0x10000)
                wire = struct.pack("!H", qid) + data[2:]
                try:
                    raw = await asyncio.wait_for(
                        self._exchange(host, port, wire, qid, q, tcp=tcp),
                        remaining / (len(ups) - i),  # share what is left with the rest
                    )
                except (TimeoutError, OSError, _BadReply, EOFError):
                    continue
                reply = struct.pack("!H", q.id) + raw[2:]
                if (raw[3] & 0x0F) in (dns.rcode.SERVFAIL, dns.rcode.REFUSED):
                    fallback = reply
                    continue
                c.forwarded += 1
                return reply
            if fallback is not None:
                c.forwarded += 1
                return fallback
            c.servfail += 1
            return self._servfail(q, tcp=tcp)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("dns: forwarding failed")
            c.servfail += 1
            return self._servfail(q, tcp=tcp)
        finally:
            self._inflight -= 1

    async def _exchange(
        self, host: str, port: int, wire: bytes, qid: int, q: dns.message.Message, *, tcp: bool
    ) -> bytes:
        raw = await (
            self._tcp_exchange(host, port, wire)
            if tcp
            else self._udp_exchange(host, port, wire, qid)
        )
        try:
            r = dns.message.from_wire(raw, ignore_trailing=True, raise_on_truncation=False)
        except dns.exception.DNSException as e:
            raise _BadReply(str(e)) from None
        if r.id != qid or not r.flags & dns.flags.QR or r.question != q.question:
            raise _BadReply("not a reply to our question")
        return raw

    async def _udp_exchange(self, host: str, port: int, wire: bytes, qid: int) -> bytes:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[bytes] = loop.create_future()
        # A fresh socket (so a fresh random source port) per query: with the random id,
        # 32 bits an off-path spoofer has to guess.
        transport, _ = await loop.create_datagram_endpoint(
            lambda: _UpstreamUdp(fut, qid), remote_addr=(host, port)
        )
        try:
            transport.sendto(wire)
            return await fut
        finally:
            transport.close()

    async def _tcp_exchange(self, host: str, port: int, wire: bytes) -> bytes:
        reader, writer = await asyncio.open_connection(host, port)
        try:
            writer.write(struct.pack("!H", len(wire)) + wire)
            await writer.drain()
            (n,) = struct.unpack("!H", await reader.readexactly(2))
            return await reader.readexactly(n)
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
