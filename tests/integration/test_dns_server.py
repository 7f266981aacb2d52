"""The embedded resolver on real sockets in real network namespaces.

Layout: an "agent" namespace runs the event loop (a thread that entered it, so every socket
the loop opens, including the forwarding sockets and the fake upstream, lives there), and a
"sandbox" namespace gets 127.0.0.11:53 from ``DnsServer.attach``. Queries are sent from
inside the sandbox (a thread in it, ``dig`` via ``ip netns exec``, and ``getent`` via the
runtime's launcher), so no test traffic touches the root namespace.
"""

from __future__ import annotations

import asyncio
import shutil
import socket
import struct
import subprocess
import sys
import threading
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any

import dns.exception
import dns.flags
import dns.message
import dns.query
import dns.rcode
import dns.rdatatype
import dns.rrset
import pytest
import uvloop

from swarmnet.dns.records import EndpointMode, Records, ServiceRecord, TaskRecord
from swarmnet.dns.server import DnsConfig, DnsServer, formerr_for, parse_resolv_conf
from swarmnet.kernel import nsutil

NET_A, NET_B = "net-a", "net-b"
DNS_IP = "127.0.0.11"
UPSTREAM = ("127.0.0.53", 53)  # the fake upstream, in the agent namespace
REFUSING = ("127.0.0.54", 53)  # nothing listens: ICMP port unreachable, ECONNREFUSED
BLACKHOLE = ("127.0.0.55", 53)  # a socket that reads and never answers
FORWARDED_IP = "10.99.0.7"


def _records(web_vip: str = "10.0.1.2") -> Records:
    return Records(
        services=[
            ServiceRecord("web", EndpointMode.VIP, (NET_A,), {NET_A: f"{web_vip}/24"}),
            ServiceRecord("db", EndpointMode.DNSRR, (NET_A,)),
            ServiceRecord("hidden", EndpointMode.VIP, (NET_B,), {NET_B: "10.0.2.2/24"}),
        ],
        tasks=[
            TaskRecord("t1", "web.1", "web", {NET_A: "10.0.1.10/24"}),
            TaskRecord("t2", "web.2", "web", {NET_A: "10.0.1.11/24"}),
            TaskRecord("d1", "db.1", "db", {NET_A: "10.0.1.20/24"}),
            TaskRecord("d2", "db.2", "db", {NET_A: "10.0.1.21/24"}),
            TaskRecord("h1", "hidden.1", "hidden", {NET_B: "10.0.2.10/24"}),
        ],
    )


# ---- pure helpers (no kernel) -------------------------------------------------------------


def test_parse_resolv_conf() -> None:
    text = (
        "# x\nsearch lan\nnameserver 10.0.0.1\nnameserver bogus\nnameserver 10.0.0.1\n"
        "nameserver ::1\nnameserver 127.0.0.53\nnameserver 10.0.0.9\n"
    )
    assert parse_resolv_conf(text) == [("10.0.0.1", 53), ("::1", 53), ("127.0.0.53", 53)]
    assert parse_resolv_conf("") == []


def test_formerr_for() -> None:
    assert formerr_for(b"") is None
    assert formerr_for(b"\x00" * 11) is None
    assert formerr_for(b"\x12\x34\x80\x00" + b"\x00" * 8) is None  # a response: drop
    reply = formerr_for(b"\x12\x34\x01\x00" + b"\x00\x05" + b"\xff" * 6)
    assert reply is not None
    qid, flags = struct.unpack("!HH", reply[:4])
    assert qid == 0x1234 and flags & 0x8000 and flags & 0x0100 and flags & 0xF == 1


# ---- kernel fixtures ------------------------------------------------------------------


class LoopThread:
    """An asyncio loop on a thread that lives in network namespace ``netns``."""

    def __init__(self, netns: str, flavour: str = "asyncio"):
        self.netns = netns
        # The agent runs on uvloop (cli.py): its socket adoption (``sock=``) must work too.
        self.loop = uvloop.new_event_loop() if flavour == "uvloop" else asyncio.new_event_loop()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="agent-loop", daemon=True)
        self.thread.start()
        assert self._ready.wait(10), "loop thread did not start"
        if self._error:
            raise self._error

    def _run(self) -> None:
        try:
            with nsutil.in_netns(self.netns):
                asyncio.set_event_loop(self.loop)
                self._ready.set()
                self.loop.run_forever()
        except BaseException as e:  # surfaced to the test by __init__
            self._error = e
            self._ready.set()

    def run(self, coro: Coroutine[Any, Any, Any], timeout: float = 20) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def call(self, fn: Callable[[], Any]) -> Any:
        async def wrap() -> Any:
            return fn()

        return self.run(wrap())

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        if not self.thread.is_alive():
            self.loop.close()


class FakeUpstream:
    """A tiny authoritative server on UDP and TCP: ``*.example.test`` A -> FORWARDED_IP,
    everything else NXDOMAIN."""

    def __init__(self) -> None:
        self.queries: list[str] = []
        self._udp: asyncio.DatagramTransport | None = None
        self._tcp: asyncio.AbstractServer | None = None
        self._blackhole: socket.socket | None = None

    def answer(self, data: bytes) -> bytes:
        q = dns.message.from_wire(data)
        name = q.question[0].name.to_text()
        self.queries.append(name)
        r = dns.message.make_response(q)
        if name.endswith(".example.test.") and q.question[0].rdtype == dns.rdatatype.A:
            r.answer.append(dns.rrset.from_text(name, 60, "IN", "A", FORWARDED_IP))
        elif not name.endswith(".example.test."):
            r.set_rcode(dns.rcode.NXDOMAIN)
        return r.to_wire()

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        up = self

        class Udp(asyncio.DatagramProtocol):
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                self.t = transport

            def datagram_received(self, data: bytes, addr: tuple) -> None:
                self.t.sendto(up.answer(data), addr)  # type: ignore[attr-defined]

        async def tcp(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            (n,) = struct.unpack("!H", await reader.readexactly(2))
            reply = self.answer(await reader.readexactly(n))
            writer.write(struct.pack("!H", len(reply)) + reply)
            await writer.drain()
            writer.close()

        self._udp, _ = await loop.create_datagram_endpoint(Udp, local_addr=UPSTREAM)
        self._tcp = await asyncio.start_server(tcp, *UPSTREAM)
        self._blackhole = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._blackhole.bind(BLACKHOLE)

    def stop(self) -> None:
        if self._udp:
            self._udp.close()
        if self._tcp:
            self._tcp.close()
        if self._blackhole:
            self._blackhole.close()


def _lo_up(ns: str) -> None:
    subprocess.run(["ip", "-n", ns, "link", "set", "lo", "up"], check=True)


@pytest.fixture(params=["asyncio", "uvloop"])
def lab(netns_name: Callable[[], str], request: pytest.FixtureRequest) -> Iterator[dict[str, Any]]:
    agent, sandbox = netns_name(), netns_name()
    for ns in (agent, sandbox):
        subprocess.run(["ip", "netns", "add", ns], check=True)
        _lo_up(ns)
    lt = LoopThread(agent, request.param)
    up = FakeUpstream()
    servers: list[DnsServer] = []
    try:
        lt.run(up.start())

        def make(upstreams: tuple[tuple[str, int], ...] = (UPSTREAM,), **kw: Any) -> DnsServer:
            srv = DnsServer(_records(), DnsConfig(upstreams=upstreams, **kw))
            servers.append(srv)
            lt.run(srv.attach(sandbox, (NET_A,)))
            return srv

        yield {"agent": agent, "sandbox": sandbox, "loop": lt, "upstream": up, "make": make}
    finally:
        for srv in servers:
            lt.run(srv.close())
        lt.call(up.stop)
        lt.stop()


def ask(
    netns: str, name: str, rdtype: str = "A", *, tcp: bool = False, timeout: float = 5
) -> dns.message.Message:
    """One query to 127.0.0.11 from inside ``netns`` (this thread enters it and returns)."""
    q = dns.message.make_query(name, rdtype)
    with nsutil.in_netns(netns):
        if tcp:
            return dns.query.tcp(q, DNS_IP, timeout=timeout)
        return dns.query.udp(q, DNS_IP, timeout=timeout)


def raw_udp(netns: str, payload: bytes, timeout: float = 1.0) -> bytes | None:
    """Send raw bytes, return the reply or None when nothing comes back in ``timeout``."""
    with nsutil.in_netns(netns):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        s.settimeout(timeout)
        s.sendto(payload, (DNS_IP, 53))
        try:
            return s.recv(65535)
        except TimeoutError:
            return None
    finally:
        s.close()


def ips(msg: dns.message.Message) -> list[str]:
    return sorted(rd.address for rrset in msg.answer for rd in rrset)


# ---- kernel tests ---------------------------------------------------------------------


@pytest.mark.kernel
@pytest.mark.parametrize("tcp", [False, True], ids=["udp", "tcp"])
def test_names_resolve_in_the_sandbox(lab: dict, tcp: bool) -> None:
    srv = lab["make"]()
    sb = lab["sandbox"]
    r = ask(sb, "web", tcp=tcp)
    assert r.rcode() == dns.rcode.NOERROR and ips(r) == ["10.0.1.2"]
    assert r.flags & dns.flags.AA and r.answer[0].ttl == 600
    assert ips(ask(sb, "tasks.web", tcp=tcp)) == ["10.0.1.10", "10.0.1.11"]
    assert ips(ask(sb, "db", tcp=tcp)) == ["10.0.1.20", "10.0.1.21"]  # dnsrr: no VIP
    assert ips(ask(sb, "WEB.2", tcp=tcp)) == ["10.0.1.11"]
    assert ips(ask(sb, "web.1.t1", tcp=tcp)) == ["10.0.1.10"]
    aaaa = ask(sb, "web", "AAAA", tcp=tcp)
    assert aaaa.rcode() == dns.rcode.NOERROR and aaaa.answer == []
    assert ask(sb, "hidden", tcp=tcp).rcode() == dns.rcode.NXDOMAIN  # other network only
    # Unknown names go to the upstream (over the client's transport).
    fwd = ask(sb, "www.example.test", tcp=tcp)
    assert fwd.rcode() == dns.rcode.NOERROR and ips(fwd) == [FORWARDED_IP]
    assert ask(sb, "nothing.invalid", tcp=tcp).rcode() == dns.rcode.NXDOMAIN
    assert "www.example.test." in lab["upstream"].queries
    assert "web." not in lab["upstream"].queries and "hidden." not in lab["upstream"].queries
    c = lab["loop"].call(lambda: srv.counters.as_dict())
    assert c["queries"] == 9 and c["answered"] == 6 and c["nxdomain"] == 1
    assert c["forwarded"] == 2 and c["servfail"] == 0


@pytest.mark.kernel
def test_update_and_scope_change_take_effect(lab: dict) -> None:
    srv = lab["make"]()
    sb, lt = lab["sandbox"], lab["loop"]
    lt.call(lambda: srv.update(_records(web_vip="10.0.1.3")))
    assert ips(ask(sb, "web")) == ["10.0.1.3"]
    lt.call(lambda: srv.set_networks(sb, (NET_B,)))
    assert ips(ask(sb, "hidden")) == ["10.0.2.2"]
    assert ask(sb, "web").rcode() == dns.rcode.NXDOMAIN
    lt.run(srv.attach(sb, (NET_A, NET_B)))  # idempotent: only the networks change
    assert ips(ask(sb, "web")) == ["10.0.1.3"]


@pytest.mark.kernel
@pytest.mark.parametrize("upstreams", [(REFUSING,), (BLACKHOLE,), (), (REFUSING, BLACKHOLE)])
def test_unreachable_upstream_gives_a_fast_servfail(lab: dict, upstreams: tuple) -> None:
    # forward_timeout_s 1 s and a client that waits 3 s: a hang fails as dns.exception.Timeout.
    srv = lab["make"](upstreams=upstreams, forward_timeout_s=1.0)
    for tcp in (False, True):
        r = ask(lab["sandbox"], "www.example.test", tcp=tcp, timeout=3)
        assert r.rcode() == dns.rcode.SERVFAIL
    assert ips(ask(lab["sandbox"], "web")) == ["10.0.1.2"]  # local names are unaffected
    assert lab["loop"].call(lambda: srv.counters.servfail) == 2


@pytest.mark.kernel
def test_a_dead_first_upstream_falls_through_to_the_next(lab: dict) -> None:
    lab["make"](upstreams=(REFUSING, UPSTREAM))
    assert ips(ask(lab["sandbox"], "a.example.test", timeout=3)) == [FORWARDED_IP]


@pytest.mark.kernel
def test_malformed_queries_get_formerr_or_are_dropped(lab: dict) -> None:
    srv = lab["make"]()
    sb = lab["sandbox"]
    assert raw_udp(sb, b"\x01") is None  # no header: dropped
    assert raw_udp(sb, b"\xab\xcd\x80\x00" + b"\x00" * 8) is None  # a response: dropped
    junk = b"\xab\xcd\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00" + b"\xc0\xff\x00"  # bad name
    reply = raw_udp(sb, junk)
    assert reply is not None
    assert reply[:2] == b"\xab\xcd" and reply[3] & 0x0F == dns.rcode.FORMERR
    two = dns.message.make_query("web", "A")
    two.question.append(dns.message.make_query("db", "A").question[0])
    reply = raw_udp(sb, two.to_wire())
    assert reply is not None and dns.message.from_wire(reply).rcode() == dns.rcode.FORMERR
    assert raw_udp(sb, b"\x00" * 5000) is None  # oversize: dropped unparsed
    # TCP: junk in a frame gets FORMERR and the connection keeps serving.
    with nsutil.in_netns(sb):
        s = socket.create_connection((DNS_IP, 53), timeout=3)
    try:
        s.sendall(struct.pack("!H", len(junk)) + junk)
        n = struct.unpack("!H", s.recv(2))[0]
        assert s.recv(n)[3] & 0x0F == dns.rcode.FORMERR
        q = dns.message.make_query("web", "A").to_wire()
        s.sendall(struct.pack("!H", len(q)) + q)
        n = struct.unpack("!H", s.recv(2))[0]
        assert ips(dns.message.from_wire(s.recv(n))) == ["10.0.1.2"]
    finally:
        s.close()
    assert ips(ask(sb, "web")) == ["10.0.1.2"]  # still serving
    c = lab["loop"].call(lambda: srv.counters.as_dict())
    assert c["dropped"] == 3 and c["formerr"] == 3
    assert c["queries"] == sum(v for k, v in c.items() if k != "queries")


@pytest.mark.kernel
def test_detach_closes_the_sockets(lab: dict) -> None:
    srv = lab["make"]()
    sb, lt = lab["sandbox"], lab["loop"]
    assert ips(ask(sb, "web")) == ["10.0.1.2"]
    assert lt.call(lambda: srv.detach(sb)) is True
    assert lt.call(lambda: srv.detach(sb)) is False
    assert lt.call(srv.sandboxes) == {}
    # Both ports are free again: nothing of ours is bound in the sandbox any more.
    with nsutil.in_netns(sb):
        u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        t = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        u.bind((DNS_IP, 53))
        t.bind((DNS_IP, 53))
    finally:
        u.close()
        t.close()
    lt.run(srv.attach(sb, (NET_A,)))  # and it can come back
    assert ips(ask(sb, "web")) == ["10.0.1.2"]


@pytest.mark.kernel
def test_attach_to_a_missing_namespace_raises(lab: dict) -> None:
    srv = lab["make"]()
    with pytest.raises(OSError):
        lab["loop"].run(srv.attach("sntest-nonexistent", (NET_A,)))
    assert "sntest-nonexistent" not in lab["loop"].call(srv.sandboxes)


@pytest.mark.kernel
def test_getent_in_the_sandbox(lab: dict, tmp_path: Path) -> None:
    lab["make"]()
    resolv = tmp_path / "resolv.conf"
    resolv.write_text(f"nameserver {DNS_IP}\noptions ndots:0\n")
    hosts = tmp_path / "hosts"
    hosts.write_text("127.0.0.1 localhost\n")

    def getent(name: str) -> subprocess.CompletedProcess:
        argv = [sys.executable, "-m", "swarmnet.runtime.enter", "--netns", lab["sandbox"]]
        argv += ["--hostname", "h", "--resolv", str(resolv), "--hosts", str(hosts), "--"]
        return subprocess.run(
            [*argv, "getent", "hosts", name], capture_output=True, text=True, timeout=30
        )

    out = getent("web")
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["10.0.1.2", "web"]
    out = getent("tasks.web")
    assert sorted(line.split()[0] for line in out.stdout.splitlines()) == ["10.0.1.10", "10.0.1.11"]
    assert getent("hidden").returncode == 2  # NXDOMAIN: getent's "not found"


@pytest.mark.kernel
def test_dig_in_the_sandbox(lab: dict) -> None:
    if shutil.which("dig") is None:
        pytest.skip("dig is not installed (apt-get install dnsutils)")
    lab["make"]()

    def dig(*args: str) -> str:
        argv = ["ip", "netns", "exec", lab["sandbox"], "dig", "+short", "+time=3", "+tries=1"]
        return subprocess.run(
            [*argv, f"@{DNS_IP}", *args], capture_output=True, text=True, timeout=30
        ).stdout

    assert dig("web").split() == ["10.0.1.2"]
    assert sorted(dig("tasks.web").split()) == ["10.0.1.10", "10.0.1.11"]
    assert sorted(dig("+tcp", "db").split()) == ["10.0.1.20", "10.0.1.21"]
    assert dig("www.example.test").split() == [FORWARDED_IP]
