"""FakeKernel and NetlinkKernel agree: one scenario, run against both, same snapshots and
the same errno for the same bad op.

The real kernel runs with ``base_netns=<fresh sntest- namespace>``, whose ``lo`` the
scenario brings up (a host namespace has it up, and so does the fake's base).

Normalisation (the only differences allowed): a MAC the scenario did not choose is random
on both sides (and a bridge takes its port's MAC in Linux), so ``Link.mac`` is compared
only for the veth peers created with ``peer_mac`` and for ``lo``; for every other link the
names, kinds, MTUs, flags, masters and vxlan attributes must match exactly.
"""

from __future__ import annotations

import errno
from collections.abc import Callable, Iterator
from dataclasses import replace

import pytest

from swarmnet.kernel import (
    Addr,
    AddrAdd,
    AddrDel,
    BridgeAdd,
    FakeKernel,
    FdbAdd,
    FdbDel,
    FdbEntry,
    KernelError,
    KernelState,
    LinkDel,
    LinkSet,
    NeighAdd,
    NeighDel,
    NeighEntry,
    NetlinkKernel,
    NetnsAdd,
    NetnsDel,
    Op,
    Route,
    RouteAdd,
    RouteDel,
    VethAdd,
    VxlanAdd,
    VxlanAttrs,
)

pytestmark = pytest.mark.kernel

PEER_MAC = "02:42:0a:00:00:05"


def _mac(i: int) -> str:
    return f"02:42:0a:01:{i >> 8:02x}:{i & 0xFF:02x}"


def _fdb(i: int) -> FdbEntry:
    return FdbEntry("vx0", _mac(i), f"198.51.100.{10 + i % 200}")


def _neigh(i: int) -> NeighEntry:
    return NeighEntry("vx0", f"10.0.1.{i}", _mac(i))


def _normalise(state: KernelState) -> KernelState:
    links = {
        name: (link if name == "lo" or link.mac == PEER_MAC else replace(link, mac=None))
        for name, link in state.links.items()
    }
    return replace(state, links=links)


class Pair:
    """Runs every step on both kernels and compares."""

    def __init__(self, fake: FakeKernel, real: NetlinkKernel, names: list[str]) -> None:
        self.fake, self.real, self.names = fake, real, names

    def ok(self, ops: list[Op]) -> None:
        self.fake.apply(ops)
        self.real.apply(ops)

    def fails(self, ops: list[Op], code: int) -> None:
        """Both raise KernelError(code) on the last op; the ops before it stay applied."""
        for kernel in (self.fake, self.real):
            with pytest.raises(KernelError) as info:
                kernel.apply(ops)
            assert (errno.errorcode.get(info.value.code), info.value.op) == (
                errno.errorcode[code],
                ops[-1],
            ), type(kernel).__name__

    def same(self) -> None:
        for ns in (None, *self.names):
            fake_has = ns is None or ns in self.fake.list_netns()
            assert fake_has == (ns is None or ns in self.real.list_netns()), ns
            if fake_has:
                assert _normalise(self.real.snapshot(ns)) == _normalise(self.fake.snapshot(ns)), ns


@pytest.fixture
def pair(netns: str, netns_name: Callable[[], str]) -> Iterator[Pair]:
    real = NetlinkKernel(base_netns=netns)
    try:
        yield Pair(FakeKernel(seed=1), real, [netns_name(), netns_name()])
    finally:
        real.close()


def test_one_scenario_same_state_same_errors(pair: Pair) -> None:
    s1, s2 = pair.names
    vx = VxlanAttrs(vni=4242, local="198.51.100.1")
    pair.ok([LinkSet("lo", up=True)])
    pair.same()

    # --- an overlay network with one local task ---------------------------------------
    pair.ok(
        [
            NetnsAdd(s1),
            BridgeAdd("br0", 1450),
            VxlanAdd("vx0", vx, 1450),
            VethAdd("ve0", "eth0", 1450, peer_netns=s1, peer_mac=PEER_MAC),
            LinkSet("vx0", master="br0", up=True),
            LinkSet("ve0", master="br0", up=True),
            LinkSet("br0", up=True),
            AddrAdd(Addr("br0", "10.0.0.1/24")),
            RouteAdd(Route("10.60.0.0/24", None, "br0")),
            RouteAdd(Route("10.61.0.0/24", "10.0.0.7", "br0")),
            LinkSet("lo", netns=s1, up=True),
            AddrAdd(Addr("eth0", "10.0.0.5/24"), netns=s1),
            LinkSet("eth0", netns=s1, up=True),
            RouteAdd(Route("default", "10.0.0.1", "eth0"), netns=s1),
        ]
    )
    pair.same()

    # --- 50 remote endpoints, then 10 go away -----------------------------------------
    pair.ok([FdbAdd(_fdb(i)) for i in range(50)] + [NeighAdd(_neigh(i)) for i in range(50)])
    pair.ok([op for i in range(0, 50, 5) for op in (FdbDel(_fdb(i)), NeighDel(_neigh(i)))])
    pair.same()

    # --- what the kernel rejects --------------------------------------------------------
    pair.fails([BridgeAdd("br0", 1500)], errno.EEXIST)
    pair.fails([VethAdd("ve1", "eth0", 1450, peer_netns=s1)], errno.EEXIST)
    pair.fails([BridgeAdd("a" * 16, 1500)], errno.ERANGE)
    pair.fails([VxlanAdd("vx1", replace(vx, local="198.51.100.2"), 1450)], errno.EEXIST)
    pair.fails([NetnsAdd(s1)], errno.EEXIST)
    pair.fails([NetnsDel(s2)], errno.ENOENT)
    pair.fails([BridgeAdd("br9", 1500, netns=s2)], errno.ENOENT)
    pair.fails([LinkDel("nope")], errno.ENODEV)
    pair.fails([LinkSet("ve0", master="nope")], errno.ENODEV)
    pair.fails([LinkSet("ve0", master="vx0")], errno.EOPNOTSUPP)  # detaches it first
    pair.ok([LinkSet("ve0", master="br0")])
    pair.fails([AddrAdd(Addr("br0", "10.0.0.1/24"))], errno.EEXIST)
    pair.fails([AddrDel(Addr("br0", "10.9.9.9/24"))], errno.EADDRNOTAVAIL)
    pair.fails([RouteAdd(Route("10.60.0.0/24", None, "br0"))], errno.EEXIST)
    pair.fails([RouteAdd(Route("10.70.0.0/24", "10.6.0.1", None))], errno.ENETUNREACH)
    pair.fails([RouteDel(Route("10.71.0.0/24", None, None))], errno.ESRCH)
    pair.fails([FdbAdd(_fdb(1))], errno.EEXIST)
    pair.fails([FdbAdd(replace(_fdb(1), dev="nope"))], errno.ENODEV)
    pair.fails([FdbDel(_fdb(0))], errno.ENOENT)
    pair.fails([NeighAdd(_neigh(1))], errno.EEXIST)
    pair.fails([NeighDel(_neigh(0))], errno.ENOENT)
    pair.fails([NeighAdd(replace(_neigh(99), dev="nope"))], errno.ENODEV)
    # a batch that fails half-way: the op before it stays, the ones after do not
    pair.fails([FdbAdd(_fdb(100)), NeighAdd(_neigh(100)), FdbAdd(_fdb(2))], errno.EEXIST)
    for kernel in (pair.fake, pair.real):
        kernel.apply([FdbAdd(_fdb(101)), NeighAdd(_neigh(101)), NeighDel(_neigh(3))])
    pair.fails([FdbAdd(_fdb(102)), FdbDel(_fdb(103))], errno.ENOENT)
    # a dst that is not the entry's: Linux answers 0 and keeps the entry
    pair.ok([FdbDel(replace(_fdb(4), dst="198.51.100.250"))])
    pair.same()

    # --- veth and netns deletion cascades -------------------------------------------------
    pair.ok(
        [
            NetnsAdd(s2),
            VethAdd("ve2", "eth0", 1400, peer_netns=s2, peer_mac=PEER_MAC),
            VethAdd("in0", "in1", 1500, netns=s1),
            LinkSet("ve2", master="br0"),  # the bridge follows its smallest port's MTU
        ]
    )
    pair.same()
    pair.ok([LinkDel("in1", netns=s1), NetnsDel(s2)])  # takes in0 and ve2 with them
    pair.same()
    pair.fails(
        [
            RouteAdd(Route("10.72.0.0/24", None, "eth0"), netns=s1),
            LinkSet("eth0", netns=s1, up=False),
            RouteAdd(Route("10.73.0.0/24", None, "eth0"), netns=s1),
        ],
        errno.ENETDOWN,
    )

    # --- link down flushes neighbours (and routes), not FDB; deleting a link clears all --
    pair.ok([LinkSet("vx0", up=False)])
    pair.same()
    pair.ok([LinkDel("vx0")])
    pair.same()
    assert pair.real.snapshot().fdb == set()
