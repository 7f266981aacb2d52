"""The asyncio driver and transport on real loopback sockets (no root needed): two nodes in
one event loop converge, a closed one is detected as failed, a graceful leave is a leave, and
hostile UDP datagrams and TCP streams are dropped and counted, never raised into the loop."""

from __future__ import annotations

import asyncio
import random
import socket
from collections.abc import AsyncIterator, Callable

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from swarmnet.gossip.config import GossipConfig
from swarmnet.gossip.core import MemberEvent, Membership
from swarmnet.gossip.driver import GossipNode
from swarmnet.gossip.keyring import Keyring
from swarmnet.gossip.messages import Ack, Ping, ip_to_bytes
from swarmnet.gossip.transport import AsyncioTransport
from swarmnet.gossip.wire import decode_packet, encode_packet

LOOPBACK = "127.0.0.1"
WAIT_S = 20.0  # generous: polling ends as soon as the condition holds


def fast_config() -> GossipConfig:
    # Fast timings so that failure detection takes about a second on loopback.
    return GossipConfig.local(
        probe_interval_s=0.2,
        probe_timeout_s=0.1,
        gossip_interval_s=0.05,
        push_pull_interval_s=2.0,
        stream_timeout_s=1.0,
    )


async def wait_for(cond: Callable[[], bool], what: str, timeout_s: float = WAIT_S) -> None:
    async with asyncio.timeout(timeout_s):
        while not cond():
            await asyncio.sleep(0.02)
    assert cond(), what


def drops(node: GossipNode, prefix: str = "drop_") -> int:
    return sum(v for k, v in node.metrics().items() if k.startswith(prefix))


class Recorder:
    def __init__(self) -> None:
        self.events: list[MemberEvent] = []

    def __call__(self, ev: MemberEvent) -> None:
        self.events.append(ev)

    def has(self, kind: str, name: str) -> bool:
        return any(e.kind == kind and e.name == name for e in self.events)


@pytest.fixture
async def make_node() -> AsyncIterator[Callable[..., object]]:
    nodes: list[GossipNode] = []

    async def make(name: str, keyring: Keyring | None = None) -> tuple[GossipNode, Recorder]:
        rec = Recorder()
        node = GossipNode(
            name,
            (LOOPBACK, 0),
            config=fast_config(),
            keyring=keyring,
            rng=random.Random(name),
            on_event=rec,
        )
        nodes.append(node)
        await node.start()
        return node, rec

    try:
        yield make
    finally:
        for node in nodes:
            await node.close()


async def test_two_nodes_converge_and_detect_a_closed_one(make_node) -> None:
    a, rec_a = await make_node("a")
    b, rec_b = await make_node("b")
    assert await b.join([a.address]) == 1
    await wait_for(lambda: rec_a.has("join", "b") and rec_b.has("join", "a"), "both joined")
    assert {m.name for m in a.members()} == {"a", "b"}
    await a.close()
    await wait_for(lambda: rec_b.has("failed", "a"), "b declares a failed")
    assert not rec_b.has("leave", "a")
    assert b.metrics().get("probe_failures", 0) >= 1


async def test_graceful_leave_is_a_leave(make_node) -> None:
    a, _ = await make_node("a")
    b, rec_b = await make_node("b")
    assert await b.join([a.address]) == 1
    await wait_for(lambda: rec_b.has("join", "a"), "b sees a")
    assert await a.leave(timeout_s=5.0, propagate_s=0.0)
    await wait_for(lambda: rec_b.has("leave", "a"), "b sees a leave")
    assert not rec_b.has("failed", "a")


async def test_events_reach_the_queue(make_node) -> None:
    a, _ = await make_node("a")
    b, _ = await make_node("b")
    assert await b.join([a.address]) == 1
    async with asyncio.timeout(WAIT_S):
        while True:
            ev = await a.events.get()
            if ev.kind == "join" and ev.name == "b":
                break


async def test_join_unreachable_returns_zero(make_node) -> None:
    a, _ = await make_node("a")
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        port = s.getsockname()[1]  # bound, not listening: connection refused
        assert await a.join([(LOOPBACK, port)]) == 0
    assert a.metrics().get("push_pull_failed", 0) == 1


def _udp_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((LOOPBACK, 0))
    sock.setblocking(False)
    return sock


async def _ping_roundtrip(node: GossipNode, sock: socket.socket, keyring=None) -> Ack:
    """A valid ping from a raw socket must still get its ack: the node is healthy."""
    loop = asyncio.get_running_loop()
    port = sock.getsockname()[1]
    ping = Ping(77, node.name, ip_to_bytes(LOOPBACK), port, "prober")
    sock.sendto(encode_packet([ping], keyring=keyring), node.address)
    async with asyncio.timeout(WAIT_S):
        while True:
            buf = await loop.sock_recv(sock, 65536)
            for msg in decode_packet(buf, keyring=keyring):
                if isinstance(msg, Ack) and msg.seq_no == 77:
                    return msg


@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_fuzz_udp_receive_path(make_node, seed: int) -> None:
    a, _ = await make_node("a")
    rng = random.Random(seed)
    sock = _udp_socket()
    try:
        # Random bytes, and random bytes behind each framing byte, so that every layer
        # (compound, compress, CRC, bodies) sees garbage, plus the empty datagram.
        for i in range(600):
            body = rng.randbytes(rng.randrange(0, 300))
            lead = bytes([i % 16]) if i % 2 else b""
            sock.sendto(lead + body, a.address)
            if i % 10 == 0:
                # Let the loop drain the socket: a burst would overflow its receive buffer.
                await asyncio.sleep(0.002)
        await wait_for(lambda: a.metrics().get("packets_in", 0) >= 500, "packets arrived")
        assert drops(a, "drop_packet_") >= 400
        assert a.metrics().get("handler_errors", 0) == 0
        await _ping_roundtrip(a, sock)
    finally:
        sock.close()


async def test_wrong_key_is_dropped_and_counted(make_node) -> None:
    key, other = bytes(range(32)), bytes(range(1, 33))
    a, _ = await make_node("a", Keyring([key]))
    b, rec_b = await make_node("b", Keyring([other]))
    assert await b.join([a.address]) == 0
    sock = _udp_socket()
    try:
        sock.sendto(encode_packet([Ping(1, "a")], keyring=Keyring([other])), a.address)
        sock.sendto(encode_packet([Ping(2, "a")]), a.address)  # plaintext to a keyed node
        await wait_for(
            lambda: (
                a.metrics().get("drop_packet_decrypt_failed", 0) >= 1
                and a.metrics().get("drop_stream_decrypt_failed", 0) >= 1
            ),
            "decryption failures counted",
        )
        await _ping_roundtrip(a, sock, keyring=Keyring([key]))
    finally:
        sock.close()
    assert not rec_b.has("join", "a")
    assert {m.name for m in a.members()} == {"a"}


async def test_key_rotation_passthrough(make_node) -> None:
    old, new = bytes(range(16)), bytes(range(16, 32))
    a, rec_a = await make_node("a", Keyring([old]))
    b, _ = await make_node("b", Keyring([old]))
    assert await b.join([a.address]) == 1
    await wait_for(lambda: rec_a.has("join", "b"), "joined with the old key")
    for n in (a, b):
        n.install_key(new)
    for n in (a, b):
        n.use_key(new)
    for n in (a, b):
        n.remove_key(old)
    sock = _udp_socket()
    try:
        await _ping_roundtrip(a, sock, keyring=Keyring([new]))
    finally:
        sock.close()


async def test_bad_streams_are_dropped_and_counted(make_node) -> None:
    a, _ = await make_node("a")
    host, port = a.address
    # An unknown type, an oversized push-pull header, and a stream that never completes
    # (cut by the stream timeout): all counted, none raised.
    huge = msgpack.packb({"Join": True, "Nodes": 2**40, "UserStateLen": 0})
    for payload in (b"\x63garbage", b"\x06" + huge, b"\x06\x83\xa4Join\xc3"):
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(payload)
        await writer.drain()
        # The node answers with an errResp or just closes: either way the read ends.
        await asyncio.wait_for(reader.read(), WAIT_S)
        writer.close()
    await wait_for(lambda: drops(a, "drop_stream_") >= 3, "bad streams counted")
    m = a.metrics()
    assert m["drop_stream_unknown_type"] == 1
    assert m["drop_stream_oversized"] == 1
    assert m["drop_stream_timeout"] == 1
    assert a.metrics().get("handler_errors", 0) == 0
    sock = _udp_socket()
    try:
        await _ping_roundtrip(a, sock)
    finally:
        sock.close()


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=512), lead=st.integers(0, 255), keyed=st.booleans())
def test_hypothesis_udp_receive_path_never_raises(data: bytes, lead: int, keyed: bool) -> None:
    """The receive path without sockets: transport decode + core receive, for any bytes."""
    keyring = Keyring([bytes(16)]) if keyed else Keyring()
    core = Membership("a", LOOPBACK, 7946, fast_config(), random.Random(0), 0.0)

    def on_packet(msgs, src) -> None:
        core.receive(src, msgs, 1.0)

    transport = AsyncioTransport(keyring, on_packet, lambda m, p: None, stream_timeout_s=1.0)
    for buf in (data, bytes([lead]) + data):
        transport._on_datagram(buf, (LOOPBACK, 9999))
    assert transport.metrics.get("handler_errors", 0) == 0
    assert transport.metrics["packets_in"] == 2
