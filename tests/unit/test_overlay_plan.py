"""Table tests of the overlay planner as values: desired() and plan() are pure functions."""

from __future__ import annotations

from dataclasses import replace

import pytest

from swarmnet.kernel.types import (
    IFNAMSIZ_MAX,
    Addr,
    AddrAdd,
    AddrDel,
    BridgeAdd,
    FdbAdd,
    FdbDel,
    FdbEntry,
    KernelState,
    Link,
    LinkDel,
    LinkSet,
    NeighAdd,
    NeighDel,
    NeighEntry,
    NetnsAdd,
    NetnsDel,
    VethAdd,
    VxlanAdd,
    VxlanAttrs,
)
from swarmnet.overlay.plan import (
    LocalAttachment,
    NodeOverlay,
    OverlayNetwork,
    RemoteEndpoint,
    bridge_name,
    desired,
    is_owned_base_link,
    mac_for_ip,
    plan,
    sandbox_name,
    veth_name,
    vxlan_name,
)

VTEP = "198.51.100.1"
PREFIX = "sn-n1-"
NET = OverlayNetwork("net1", "front", 4242, "10.9.0.0/24")
NET2 = OverlayNetwork("net2", "back", 4243, "10.9.1.0/24")
SB = sandbox_name(PREFIX, "task1")
ATT = LocalAttachment("task1", "net1", "10.9.0.2/24", SB, "eth0")
V = veth_name("task1", "net1")
BR, VX = "sn-br-4242", "sn-vx-4242"


def node(**kw: object) -> NodeOverlay:
    base = dict(
        vtep=VTEP,
        underlay_mtu=1500,
        networks=(NET, NET2),
        sandboxes=(SB,),
        attachments=(ATT,),
        remotes=(),
        netns_prefix=PREFIX,
    )
    base.update(kw)
    return NodeOverlay(**base)  # type: ignore[arg-type]


def converged(n: NodeOverlay) -> tuple[KernelState, set[str], dict[str, KernelState]]:
    """A kernel that already holds exactly desired(n)."""
    d = desired(n)
    return d.base, set(d.sandboxes), d.sandboxes


def fdb_neigh(ip: str, vtep: str, dev: str = VX) -> tuple[FdbEntry, NeighEntry]:
    return FdbEntry(dev, mac_for_ip(ip), vtep), NeighEntry(dev, ip, mac_for_ip(ip))


# ---- names ----------------------------------------------------------------------------


def test_mac_for_ip_is_dockers_rule() -> None:
    assert mac_for_ip("10.0.1.5") == "02:42:0a:00:01:05"
    assert mac_for_ip("192.168.255.254") == "02:42:c0:a8:ff:fe"


@pytest.mark.parametrize("vni", [1, 4096, 4242, (1 << 24) - 1])
def test_names_fit_ifnamsiz_and_are_owned(vni: int) -> None:
    for name in (bridge_name(vni), vxlan_name(vni)):
        assert len(name) <= IFNAMSIZ_MAX
        assert is_owned_base_link(name)


def test_veth_name_is_deterministic_short_and_distinct() -> None:
    long_id = "x" * 64
    v = veth_name(long_id, long_id)
    assert v == veth_name(long_id, long_id)
    assert len(v) == IFNAMSIZ_MAX and v.startswith("sn-v") and is_owned_base_link(v)
    assert veth_name("ab", "c") != veth_name("a", "bc")
    names = {veth_name(f"task{i}", f"net{j}") for i in range(200) for j in range(5)}
    assert len(names) == 1000


@pytest.mark.parametrize("name", ["eth0", "sn-lb-1", "sn-brx", "sn-vx-", "docker0", "sn-vABC"])
def test_foreign_names_are_not_owned(name: str) -> None:
    assert not is_owned_base_link(name)


# ---- desired --------------------------------------------------------------------------


def test_empty_node_wants_nothing_and_plans_nothing() -> None:
    n = node(networks=(), sandboxes=(), attachments=(), remotes=())
    d = desired(n)
    assert d.base == KernelState() and d.sandboxes == {}
    assert plan(n, KernelState(), set(), {}) == []


def test_desired_one_network_one_attachment() -> None:
    d = desired(node())
    assert d.base == KernelState(
        links={
            BR: Link(BR, "bridge", 1450, True),
            VX: Link(VX, "vxlan", 1450, True, master=BR, vxlan=VxlanAttrs(4242, VTEP)),
            V: Link(V, "veth", 1450, True, master=BR),
        }
    )
    assert d.sandboxes == {
        SB: KernelState(
            links={
                "lo": Link("lo", "", 65536, True),
                "eth0": Link("eth0", "veth", 1450, True, mac="02:42:0a:09:00:02"),
            },
            addrs={Addr("eth0", "10.9.0.2/24")},
        )
    }


def test_network_without_local_attachment_is_not_programmed() -> None:
    # NET2 is known but no local task is on it: a remote on it must not create devices.
    n = node(remotes=(RemoteEndpoint("net2", "10.9.1.7", "198.51.100.2"),))
    assert set(desired(n).base.links) == {BR, VX, V}
    assert desired(n).base.fdb == set()


def test_sandbox_without_network_still_exists() -> None:
    other = sandbox_name(PREFIX, "lonely")
    n = node(sandboxes=(SB, other))
    assert desired(n).sandboxes[other] == KernelState(links={"lo": Link("lo", "", 65536, True)})


def test_remotes_filtered_and_deduplicated() -> None:
    n = node(
        remotes=(
            RemoteEndpoint("net1", "10.9.0.3", "198.51.100.2"),
            RemoteEndpoint("net1", "10.9.0.4", VTEP),  # our own VTEP: skipped
            RemoteEndpoint("net9", "10.9.9.9", "198.51.100.2"),  # unknown network
            RemoteEndpoint("net2", "10.9.1.9", "198.51.100.2"),  # not local here
            RemoteEndpoint("net1", "10.9.0.2", "198.51.100.3"),  # claims a local IP
            RemoteEndpoint("net1", "10.9.0.5", "198.51.100.9"),  # same IP twice:
            RemoteEndpoint("net1", "10.9.0.5", "198.51.100.4"),  # lowest VTEP wins
        )
    )
    f1, n1 = fdb_neigh("10.9.0.3", "198.51.100.2")
    f2, n2 = fdb_neigh("10.9.0.5", "198.51.100.4")
    assert desired(n).base.fdb == {f1, f2}
    assert desired(n).base.neigh == {n1, n2}
    # Input order does not matter.
    assert desired(replace(n, remotes=n.remotes[::-1])) == desired(n)


# ---- plan -----------------------------------------------------------------------------


def test_plan_from_scratch_one_network_one_attachment() -> None:
    ops = plan(node(), KernelState(), set(), {})
    assert ops == [
        NetnsAdd(SB),
        LinkSet("lo", netns=SB, up=True),
        BridgeAdd(BR, 1450),
        LinkSet(BR, up=True),
        VxlanAdd(VX, VxlanAttrs(4242, VTEP), 1450),
        LinkSet(VX, master=BR, up=True),
        VethAdd(V, "eth0", 1450, peer_netns=SB, peer_mac="02:42:0a:09:00:02"),
        LinkSet(V, master=BR, up=True),
        AddrAdd(Addr("eth0", "10.9.0.2/24"), netns=SB),
        LinkSet("eth0", netns=SB, up=True),
    ]


def test_desired_state_is_a_fixed_point() -> None:
    n = node(remotes=(RemoteEndpoint("net1", "10.9.0.3", "198.51.100.2"),))
    assert plan(n, *converged(n)) == []


def test_remote_endpoints_produce_fdb_and_neigh_at_the_end() -> None:
    n0 = node()
    n = node(
        remotes=(
            RemoteEndpoint("net1", "10.9.0.4", "198.51.100.3"),
            RemoteEndpoint("net1", "10.9.0.3", "198.51.100.2"),
        )
    )
    f3, n3 = fdb_neigh("10.9.0.3", "198.51.100.2")
    f4, n4 = fdb_neigh("10.9.0.4", "198.51.100.3")
    assert plan(n, *converged(n0)) == [FdbAdd(f3), FdbAdd(f4), NeighAdd(n3), NeighAdd(n4)]
    # From scratch too, the entries form one contiguous tail after every link op.
    ops = plan(n, KernelState(), set(), {})
    assert ops[-4:] == [FdbAdd(f3), FdbAdd(f4), NeighAdd(n3), NeighAdd(n4)]
    assert not any(isinstance(o, FdbAdd | NeighAdd) for o in ops[:-4])


def test_removing_a_remote_removes_its_entries() -> None:
    r3 = RemoteEndpoint("net1", "10.9.0.3", "198.51.100.2")
    r4 = RemoteEndpoint("net1", "10.9.0.4", "198.51.100.3")
    before = node(remotes=(r3, r4))
    after = node(remotes=(r3,))
    f4, n4 = fdb_neigh("10.9.0.4", "198.51.100.3")
    assert plan(after, *converged(before)) == [NeighDel(n4), FdbDel(f4)]


def test_changed_vtep_replaces_the_fdb_entry_only() -> None:
    before = node(remotes=(RemoteEndpoint("net1", "10.9.0.3", "198.51.100.2"),))
    after = node(remotes=(RemoteEndpoint("net1", "10.9.0.3", "198.51.100.7"),))
    old, _ = fdb_neigh("10.9.0.3", "198.51.100.2")
    new, _ = fdb_neigh("10.9.0.3", "198.51.100.7")
    assert plan(after, *converged(before)) == [FdbDel(old), FdbAdd(new)]


def test_changed_neighbour_mac_is_replaced() -> None:
    n = node(remotes=(RemoteEndpoint("net1", "10.9.0.3", "198.51.100.2"),))
    base, netns, sbs = converged(n)
    _, good = fdb_neigh("10.9.0.3", "198.51.100.2")
    bad = NeighEntry(VX, "10.9.0.3", "02:42:de:ad:be:ef")
    base.neigh = {bad}
    assert plan(n, base, netns, sbs) == [NeighDel(bad), NeighAdd(good)]


def test_remote_on_a_network_we_do_not_have_is_ignored() -> None:
    n = node(remotes=(RemoteEndpoint("net2", "10.9.1.3", "198.51.100.2"),))
    assert plan(n, *converged(node())) == []


def test_entries_on_foreign_devices_are_left_alone() -> None:
    n = node()
    base, netns, sbs = converged(n)
    base.links["vxlan0"] = Link("vxlan0", "vxlan", 1450, True, vxlan=VxlanAttrs(7, VTEP))
    base.fdb = {FdbEntry("vxlan0", "02:42:0a:00:00:01", "198.51.100.9")}
    base.neigh = {NeighEntry("vxlan0", "10.0.0.1", "02:42:0a:00:00:01")}
    assert plan(n, base, netns, sbs) == []


def test_network_removal_deletes_veths_then_vxlan_then_bridge_and_keeps_foreign() -> None:
    before = node(remotes=(RemoteEndpoint("net1", "10.9.0.3", "198.51.100.2"),))
    base, netns, sbs = converged(before)
    base.links["eth0"] = Link("eth0", "veth", 1500, True)
    base.links["sn-lb-1"] = Link("sn-lb-1", "bridge", 1500, True)
    after = node(attachments=(), remotes=before.remotes)
    # The sandbox stays (the task still runs): only its overlay endpoint goes, with the veth.
    assert plan(after, base, netns, sbs) == [LinkDel(V), LinkDel(VX), LinkDel(BR)]


def test_sandboxes_created_and_only_owned_undesired_ones_removed() -> None:
    gone = sandbox_name(PREFIX, "old")
    other_node = sandbox_name("sn-n2-", "task9")
    n = node(sandboxes=(SB,), attachments=(), remotes=())
    netns = {gone, other_node, "sntest-host", SB + "x"}
    ops = plan(n, KernelState(), netns, {})
    # SB+"x" starts with our owned prefix and is not desired, so it is ours to remove.
    assert ops == [
        NetnsDel(gone),
        NetnsDel(SB + "x"),
        NetnsAdd(SB),
        LinkSet("lo", netns=SB, up=True),
    ]


def test_task_removal_deletes_its_veth_before_its_sandbox() -> None:
    base, netns, sbs = converged(node())
    n = node(sandboxes=(), attachments=())
    assert plan(n, base, netns, sbs) == [LinkDel(V), LinkDel(VX), LinkDel(BR), NetnsDel(SB)]


def test_wrong_mtu_master_and_down_are_fixed_in_place() -> None:
    n = node()
    base, netns, sbs = converged(n)
    base.links[BR] = replace(base.links[BR], mtu=1500, up=False)
    base.links[VX] = replace(base.links[VX], master=None)
    base.links[V] = replace(base.links[V], mtu=9000)
    sbs[SB].links["eth0"] = replace(sbs[SB].links["eth0"], up=False)
    sbs[SB].links["lo"] = replace(sbs[SB].links["lo"], up=False)
    assert plan(n, base, netns, sbs) == [
        LinkSet("lo", netns=SB, up=True),
        LinkSet(BR, mtu=1450, up=True),
        LinkSet(VX, master=BR),
        LinkSet(V, mtu=1450),
        LinkSet("eth0", netns=SB, up=True),
    ]


def test_vxlan_with_wrong_attrs_is_recreated_and_entries_reprogrammed() -> None:
    n = node(remotes=(RemoteEndpoint("net1", "10.9.0.3", "198.51.100.2"),))
    base, netns, sbs = converged(n)
    base.links[VX] = replace(base.links[VX], vxlan=VxlanAttrs(4242, "198.51.100.99"))
    f, nb = fdb_neigh("10.9.0.3", "198.51.100.2")
    assert plan(n, base, netns, sbs) == [
        LinkDel(VX),
        VxlanAdd(VX, VxlanAttrs(4242, VTEP), 1450),
        LinkSet(VX, master=BR, up=True),
        FdbAdd(f),
        NeighAdd(nb),
    ]


def test_wrong_kind_under_our_name_is_recreated_and_ports_reattached() -> None:
    n = node()
    base, netns, sbs = converged(n)
    base.links[BR] = Link(BR, "vxlan", 1450, True, vxlan=VxlanAttrs(1, VTEP))
    ops = plan(n, base, netns, sbs)
    # Deleting it releases its ports, so the plan re-enslaves them.
    assert ops == [
        LinkDel(BR),
        BridgeAdd(BR, 1450),
        LinkSet(BR, up=True),
        LinkSet(VX, master=BR),
        LinkSet(V, master=BR),
    ]


def test_address_changes_in_sandbox() -> None:
    n = node()
    base, netns, sbs = converged(n)
    sbs[SB].addrs = {Addr("eth0", "10.9.0.77/24"), Addr("lo", "127.0.0.1/8")}
    assert plan(n, base, netns, sbs) == [
        AddrDel(Addr("eth0", "10.9.0.77/24"), netns=SB),
        AddrAdd(Addr("eth0", "10.9.0.2/24"), netns=SB),
    ]


def test_broken_veth_pair_is_rebuilt() -> None:
    n = node()
    base, netns, sbs = converged(n)
    # The sandbox end carries another MAC: it is not our pair. Both ends are rebuilt.
    sbs[SB].links["eth0"] = replace(sbs[SB].links["eth0"], mac="aa:bb:cc:dd:ee:ff")
    ops = plan(n, base, netns, sbs)
    assert ops[:2] == [LinkDel("eth0", netns=SB), LinkDel(V)]
    assert ops[2] == VethAdd(V, "eth0", 1450, peer_netns=SB, peer_mac="02:42:0a:09:00:02")
    # The base end alone (its sandbox gone and recreated): delete it, create the pair anew.
    base, netns, sbs = converged(n)
    netns.discard(SB)
    ops = plan(n, base, netns, {})
    assert ops[:3] == [LinkDel(V), NetnsAdd(SB), LinkSet("lo", netns=SB, up=True)]
    assert any(isinstance(o, VethAdd) for o in ops)


def test_two_networks_two_tasks_order() -> None:
    sb2 = sandbox_name(PREFIX, "task2")
    atts = (
        LocalAttachment("task2", "net2", "10.9.1.3/24", sb2, "eth1"),
        LocalAttachment("task2", "net1", "10.9.0.3/24", sb2, "eth0"),
        ATT,
    )
    n = node(sandboxes=(SB, sb2), attachments=atts)
    ops = plan(n, KernelState(), set(), {})
    names = [(type(o).__name__, getattr(o, "name", None)) for o in ops]
    # Every bridge precedes its ports; every namespace precedes links created in it.
    for i, o in enumerate(ops):
        if isinstance(o, VxlanAdd | VethAdd):
            master = next(
                x.master for x in ops[i + 1 :] if isinstance(x, LinkSet) and x.name == o.name
            )
            assert ("BridgeAdd", master) in names[:i]
        if isinstance(o, VethAdd):
            assert NetnsAdd(o.peer_netns) in ops[:i]  # type: ignore[arg-type]
    assert plan(n, *converged(n)) == []
