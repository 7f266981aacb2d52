"""FakeKernel behaves like Linux (the same facts are checked against the real kernel in
tests/integration/test_kernel_parity.py), and NetlinkKernel's hand-packed batch messages
are byte-identical to pyroute2's ndmsg encoding."""

from __future__ import annotations

import errno
import socket

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
    LinkDel,
    LinkSet,
    NeighAdd,
    NeighDel,
    NeighEntry,
    NetnsAdd,
    NetnsDel,
    Route,
    RouteAdd,
    RouteDel,
    VethAdd,
    VxlanAdd,
    VxlanAttrs,
)
from swarmnet.kernel.netlink import encode_neigh

VX = VxlanAttrs(vni=4096, local="198.51.100.1")
FDB = FdbEntry("vx0", "02:42:0a:00:00:06", "198.51.100.2")
NEIGH = NeighEntry("vx0", "10.0.0.6", "02:42:0a:00:00:06")


def errno_of(k: FakeKernel, *ops: object) -> str:
    with pytest.raises(KernelError) as info:
        k.apply(list(ops))  # type: ignore[arg-type]
    return "EOPNOTSUPP" if info.value.code == errno.EOPNOTSUPP else errno.errorcode[info.value.code]


@pytest.fixture
def k() -> FakeKernel:
    k = FakeKernel(seed=7)
    k.apply(
        [
            NetnsAdd("sb1"),
            BridgeAdd("br0", 1450),
            VxlanAdd("vx0", VX, 1450),
            VethAdd("ve0", "eth0", 1450, peer_netns="sb1", peer_mac="02:42:0A:00:00:05"),
            LinkSet("vx0", master="br0", up=True),
            LinkSet("ve0", master="br0", up=True),
        ]
    )
    return k


def test_fresh_namespaces_look_like_linux() -> None:
    k = FakeKernel()
    base = k.snapshot()
    assert base.links["lo"].up and base.addrs == {Addr("lo", "127.0.0.1/8")}
    k.apply([NetnsAdd("n1")])
    n1 = k.snapshot("n1")
    assert list(n1.links) == ["lo"] and not n1.links["lo"].up and not n1.addrs
    k.apply([LinkSet("lo", netns="n1", up=True)])
    assert k.snapshot("n1").addrs == {Addr("lo", "127.0.0.1/8")}
    assert k.list_netns() == {"n1"}
    assert errno_of(k, BridgeAdd("b", 1500, netns="nope")) == "ENOENT"
    with pytest.raises(KernelError) as info:
        k.snapshot("nope")
    assert info.value.is_not_found()


def test_links_are_created_down_with_seeded_lowercase_macs(k: FakeKernel) -> None:
    links = k.snapshot().links
    assert not links["br0"].up and links["vx0"].up and links["vx0"].master == "br0"
    assert links["vx0"].vxlan == VX and links["br0"].kind == "bridge"
    assert k.snapshot("sb1").links["eth0"].mac == "02:42:0a:00:00:05"
    for link in links.values():
        assert link.mac == link.mac.lower() and len(link.mac) == 17
    other = FakeKernel(seed=7)
    other.apply([NetnsAdd("sb1"), BridgeAdd("br0", 1450)])
    assert other.snapshot().links["br0"].mac == links["br0"].mac  # same seed, same MACs
    assert int(links["br0"].mac[:2], 16) & 0x03 == 0x02  # unicast, locally administered


@pytest.mark.parametrize(
    ("op", "code"),
    [
        (BridgeAdd("br0", 1500), "EEXIST"),
        (VethAdd("x0", "eth0", 1500, peer_netns="sb1"), "EEXIST"),
        (BridgeAdd("a" * 16, 1500), "ERANGE"),
        (BridgeAdd("a/b", 1500), "EINVAL"),
        (VxlanAdd("vx1", VxlanAttrs(4096, "198.51.100.9"), 1450), "EEXIST"),
        (NetnsAdd("sb1"), "EEXIST"),
        (NetnsDel("nope"), "ENOENT"),
        (LinkDel("nope"), "ENODEV"),
        (LinkSet("ve0", master="nope"), "ENODEV"),
        (LinkSet("ve0", master="vx0"), "EOPNOTSUPP"),
        (AddrAdd(Addr("nope", "10.0.0.1/24")), "ENODEV"),
        (AddrDel(Addr("br0", "10.0.0.1/24")), "EADDRNOTAVAIL"),
        (RouteAdd(Route("10.1.0.0/24", None, "br0")), "ENETDOWN"),
        (RouteAdd(Route("10.1.0.0/24", "10.9.0.1", None)), "ENETUNREACH"),
        (RouteDel(Route("10.1.0.0/24")), "ESRCH"),
        (FdbAdd(FdbEntry("nope", FDB.mac, FDB.dst)), "ENODEV"),
        (FdbDel(FDB), "ENOENT"),
        (NeighAdd(NeighEntry("nope", NEIGH.ip, NEIGH.mac)), "ENODEV"),
        (NeighDel(NEIGH), "ENOENT"),
    ],
)
def test_rejects_what_linux_rejects(k: FakeKernel, op: object, code: str) -> None:
    assert errno_of(k, op) == code


def test_duplicates_are_eexist_and_errors_classify(k: FakeKernel) -> None:
    k.apply([FdbAdd(FDB), NeighAdd(NEIGH), AddrAdd(Addr("br0", "10.0.0.1/24"))])
    assert errno_of(k, FdbAdd(FdbEntry("vx0", FDB.mac, "198.51.100.3"))) == "EEXIST"
    assert errno_of(k, NeighAdd(NeighEntry("vx0", NEIGH.ip, "02:00:00:00:00:01"))) == "EEXIST"
    assert errno_of(k, AddrAdd(Addr("br0", "10.0.0.1/24"))) == "EEXIST"
    with pytest.raises(KernelError) as info:
        k.apply([FdbAdd(FDB)])
    assert info.value.is_exists() and not info.value.is_not_found()
    assert info.value.op == FdbAdd(FDB)
    # the reconciler pattern: adding what is there fails, so diff then apply; once the
    # state matches, the diff is empty and a second pass applies nothing
    n = len(k.ops_applied)
    k.apply([])
    assert len(k.ops_applied) == n


def test_apply_stops_at_first_failure_keeping_earlier_ops(k: FakeKernel) -> None:
    before = len(k.ops_applied)
    ops = [FdbAdd(FDB), FdbAdd(FDB), NeighAdd(NEIGH)]
    with pytest.raises(KernelError) as info:
        k.apply(ops)
    assert info.value.op is ops[1]
    state = k.snapshot()
    assert state.fdb == {FDB} and state.neigh == set()
    assert k.ops_applied[before:] == [ops[0]]


def test_fdb_del_with_another_dst_is_a_noop_like_vxlan(k: FakeKernel) -> None:
    k.apply([FdbAdd(FDB), FdbDel(FdbEntry("vx0", FDB.mac, "198.51.100.99"))])
    assert k.snapshot().fdb == {FDB}
    k.apply([FdbDel(FDB)])
    assert k.snapshot().fdb == set()


def test_deleting_one_veth_end_deletes_the_peer(k: FakeKernel) -> None:
    k.apply([LinkDel("eth0", netns="sb1")])
    assert "ve0" not in k.snapshot().links
    assert "eth0" not in k.snapshot("sb1").links


def test_netns_deletion_takes_its_links_and_their_veth_peers(k: FakeKernel) -> None:
    k.apply([AddrAdd(Addr("eth0", "10.0.0.5/24"), netns="sb1"), NetnsDel("sb1")])
    assert k.list_netns() == set()
    assert set(k.snapshot().links) == {"lo", "br0", "vx0"}
    assert errno_of(k, LinkSet("eth0", netns="sb1", up=True)) == "ENOENT"


def test_entries_vanish_with_their_device(k: FakeKernel) -> None:
    k.apply([FdbAdd(FDB), NeighAdd(NEIGH), AddrAdd(Addr("vx0", "10.0.0.2/24"))])
    k.apply([LinkDel("vx0")])
    state = k.snapshot()
    assert (
        state.fdb == set() and state.neigh == set() and state.addrs == {Addr("lo", "127.0.0.1/8")}
    )


def test_link_down_flushes_neighbours_and_routes_but_not_fdb(k: FakeKernel) -> None:
    k.apply(
        [
            LinkSet("br0", up=True),
            AddrAdd(Addr("br0", "10.0.0.1/24")),
            RouteAdd(Route("10.5.0.0/16", "10.0.0.9", "br0")),
            FdbAdd(FDB),
            NeighAdd(NEIGH),
        ]
    )
    assert k.snapshot().routes == {Route("10.5.0.0/16", "10.0.0.9", "br0")}
    k.apply([LinkSet("vx0", up=False), LinkSet("br0", up=False)])
    state = k.snapshot()
    assert state.fdb == {FDB} and state.neigh == set() and state.routes == set()
    assert Addr("br0", "10.0.0.1/24") in state.addrs


def test_bridge_mtu_follows_its_smallest_port_unless_pinned(k: FakeKernel) -> None:
    k.apply([VethAdd("ve1", "p1", 1400), LinkSet("ve1", master="br0")])
    assert k.snapshot().links["br0"].mtu == 1400
    k.apply([LinkSet("ve1", master="")])
    assert k.snapshot().links["br0"].mtu == 1450
    k.apply([LinkSet("br0", mtu=1500), LinkSet("ve1", master="br0")])
    assert k.snapshot().links["br0"].mtu == 1500


def test_failed_master_change_leaves_the_port_detached(k: FakeKernel) -> None:
    assert errno_of(k, LinkSet("ve0", master="vx0")) == "EOPNOTSUPP"
    assert k.snapshot().links["ve0"].master is None


def test_snapshot_is_a_copy(k: FakeKernel) -> None:
    snap = k.snapshot()
    snap.links.clear()
    snap.fdb.add(FDB)
    assert "br0" in k.snapshot().links and k.snapshot().fdb == set()


@pytest.mark.parametrize("cls", [FdbAdd, FdbDel, NeighAdd, NeighDel])
def test_batch_encoding_matches_pyroute2(cls: type) -> None:
    """The raw batch path packs with struct; it must say what pyroute2's ndmsg says."""
    from pyroute2.netlink import NLM_F_ACK, NLM_F_CREATE, NLM_F_EXCL, NLM_F_REQUEST
    from pyroute2.netlink.rtnl import RTM_DELNEIGH, RTM_NEWNEIGH
    from pyroute2.netlink.rtnl.ndmsg import ndmsg

    fdb = cls in (FdbAdd, FdbDel)
    op = cls(FDB if fdb else NEIGH)
    msg = ndmsg()
    msg["family"] = 7 if fdb else socket.AF_INET
    msg["ifindex"] = 42
    msg["state"] = 0xC0 if fdb else 0x80
    msg["flags"] = 0x02 if fdb else 0
    msg["attrs"] = [("NDA_DST", FDB.dst if fdb else NEIGH.ip), ("NDA_LLADDR", FDB.mac)]
    add = cls in (FdbAdd, NeighAdd)
    msg["header"]["type"] = RTM_NEWNEIGH if add else RTM_DELNEIGH
    msg["header"]["flags"] = NLM_F_REQUEST | NLM_F_ACK | (NLM_F_CREATE | NLM_F_EXCL if add else 0)
    msg["header"]["sequence_number"] = 1234
    msg.encode()
    assert encode_neigh(op, 42, 1234) == bytes(msg.data)
