"""The IPVS backend without a kernel: netlink attribute encoding and decoding, fwmark
allocation, the plans (order of nft and IPVS steps) and the owned nft table's text, and the
backend choice. The kernel half runs in the VM lab (tests/integration/test_lb_ipvs_vm.py)."""

from __future__ import annotations

import errno
import socket
import struct

import pytest

from swarmnet.kernel.errors import KernelError
from swarmnet.lb import backend as lb_backend
from swarmnet.lb import ipvs
from swarmnet.lb.ipvs import IpvsConfig, Req, allocate_marks, plan_changes, plan_full
from swarmnet.lb.plan import ALL_PORTS, Backend, LBService, LBState, diff

CFG = IpvsConfig()
M0 = CFG.mark_base
VIP = "10.0.0.2"


def allports(*ips: str, weight: int = 1, proto: str = "tcp", vip: str = VIP) -> LBService:
    return LBService(vip, proto, ALL_PORTS, tuple(Backend(ip, ALL_PORTS, weight) for ip in ips))


def web(*ips: str, weight: int = 1, port: int = 80) -> LBService:
    return LBService(VIP, "tcp", port, tuple(Backend(ip, 8080, weight) for ip in ips))


def attrs_of(nested: bytes) -> dict[int, bytes]:
    return ipvs.parse_attrs(ipvs.parse_attrs(nested)[ipvs.IPVS_CMD_ATTR_SERVICE])


# ---- encoding -------------------------------------------------------------------------


def test_an_attribute_is_length_type_payload_padded_to_4_bytes() -> None:
    assert ipvs._nla(ipvs.SVC_PORT, ipvs._be16(80)) == b"\x06\x00\x04\x00\x00\x50\x00\x00"
    nest = ipvs._nest(ipvs.IPVS_CMD_ATTR_SERVICE, [ipvs._nla(ipvs.SVC_AF, ipvs._u16(2))])
    assert nest == b"\x0c\x00\x01\x80" + b"\x06\x00\x01\x00\x02\x00\x00\x00"  # NLA_F_NESTED


def test_a_port_service_is_keyed_on_protocol_address_and_port() -> None:
    a = attrs_of(ipvs.service_attr(web(), full=False))
    assert set(a) == {ipvs.SVC_AF, ipvs.SVC_PROTOCOL, ipvs.SVC_ADDR, ipvs.SVC_PORT}
    assert a[ipvs.SVC_ADDR] == socket.inet_aton(VIP)
    assert a[ipvs.SVC_PORT][:2] == b"\x00\x50"  # network order
    assert struct.unpack("=H", a[ipvs.SVC_PROTOCOL][:2])[0] == socket.IPPROTO_TCP


def test_a_fwmark_service_is_keyed_on_the_mark_alone_and_a_new_one_is_complete() -> None:
    a = attrs_of(ipvs.service_attr(allports(), full=True, scheduler="rr", mark=M0 + 3))
    assert ipvs.SVC_ADDR not in a and ipvs.SVC_PORT not in a and ipvs.SVC_PROTOCOL not in a
    assert struct.unpack("=I", a[ipvs.SVC_FWMARK])[0] == M0 + 3
    # the kernel refuses a new service without scheduler, flags, timeout and netmask
    assert a[ipvs.SVC_SCHED_NAME] == b"rr\0"
    assert {ipvs.SVC_FLAGS, ipvs.SVC_TIMEOUT, ipvs.SVC_NETMASK} <= set(a)


@pytest.mark.parametrize(
    "svc, mark, expect",
    [
        (web(), None, LBService(VIP, "tcp", 80)),
        (LBService("10.9.8.7", "udp", 53), None, LBService("10.9.8.7", "udp", 53)),
        (allports(), M0 + 7, M0 + 7),
    ],
)
def test_a_dumped_service_decodes_to_its_key_or_its_mark(svc, mark, expect) -> None:
    assert ipvs.parse_service(ipvs.service_attr(svc, True, "rr", mark)) == expect


def test_services_we_do_not_program_are_skipped_in_a_dump() -> None:
    v6 = ipvs._nest(ipvs.IPVS_CMD_ATTR_SERVICE, [ipvs._nla(ipvs.SVC_AF, ipvs._u16(10))])
    assert ipvs.parse_service(v6) is None
    port0 = ipvs.service_attr(LBService(VIP, "tcp", 0), False)  # a port-0 non-fwmark one
    assert ipvs.parse_service(port0) is None


@pytest.mark.parametrize("b", [Backend("10.0.1.5", 8080, 3), Backend("10.0.1.6", 0, 0)])
def test_a_destination_round_trips_with_nat_forwarding(b: Backend) -> None:
    nested = ipvs.dest_attr(b, True)
    d = ipvs.parse_attrs(ipvs.parse_attrs(nested)[ipvs.IPVS_CMD_ATTR_DEST])
    assert struct.unpack("=I", d[ipvs.DEST_FWD_METHOD])[0] == 0  # MASQ, not DR's 3
    assert ipvs.parse_dest(nested) == b


# ---- marks --------------------------------------------------------------------------------


def test_marks_are_the_lowest_free_ones_in_key_order_and_kept_ones_stay() -> None:
    used = {(VIP, "tcp"): M0 + 1}
    wanted = [("10.0.0.9", "tcp"), (VIP, "tcp"), ("10.0.0.3", "udp")]
    assert allocate_marks(used, wanted, CFG) == {
        ("10.0.0.3", "udp"): M0,
        ("10.0.0.9", "tcp"): M0 + 2,
    }
    assert allocate_marks(used, list(reversed(wanted)), CFG) == allocate_marks(used, wanted, CFG)


def test_running_out_of_marks_is_a_kernel_error_not_a_wrapped_mark() -> None:
    small = IpvsConfig(mark_count=2)
    with pytest.raises(KernelError) as e:
        allocate_marks({}, [("10.0.0.1", "tcp"), ("10.0.0.2", "tcp"), ("10.0.0.3", "tcp")], small)
    assert e.value.code == errno.ENOSPC
    assert small.owns_mark(small.mark_base + 1) and not small.owns_mark(small.mark_base + 2)


# ---- plans --------------------------------------------------------------------------------


def cmds(reqs: list[Req]) -> list[int]:
    return [r.cmd for r in reqs]


def test_adding_an_all_ports_service_creates_the_fwmark_service_then_maps_the_vip() -> None:
    svc = allports("10.0.1.5", "10.0.1.6")
    p = plan_changes(diff(LBState(), LBState.of(svc)), {}, CFG)
    assert p.pre == ""  # nothing is marked before IPVS can take it
    assert cmds(p.reqs) == [ipvs.IPVS_CMD_NEW_SERVICE] + [ipvs.IPVS_CMD_NEW_DEST] * 2
    assert attrs_of(p.reqs[0].attrs[0])[ipvs.SVC_FWMARK] == struct.pack("=I", M0)
    assert p.post == f"add element inet swarmnet-ipvs marks {{ {VIP} . tcp : {M0:#x} }}\n"
    assert p.marks == {(VIP, "tcp"): M0}


def test_removing_an_all_ports_service_unmaps_the_vip_first() -> None:
    svc = allports("10.0.1.5")
    p = plan_changes(diff(LBState.of(svc), LBState()), {(VIP, "tcp"): M0 + 4}, CFG)
    assert p.pre == f"delete element inet swarmnet-ipvs marks {{ {VIP} . tcp }}\n"
    assert cmds(p.reqs) == [ipvs.IPVS_CMD_DEL_SERVICE]
    assert attrs_of(p.reqs[0].attrs[0])[ipvs.SVC_FWMARK] == struct.pack("=I", M0 + 4)
    assert p.post == "" and p.marks == {}


def test_losing_the_last_live_backend_rejects_before_the_destination_goes() -> None:
    old, new = web("10.0.1.5"), web()
    p = plan_changes(diff(LBState.of(old), LBState.of(new)), {}, CFG)
    assert p.pre == f"add element inet swarmnet-ipvs rejects {{ {VIP} . tcp . 80 }}\n"
    assert cmds(p.reqs) == [ipvs.IPVS_CMD_DEL_DEST] and p.post == ""
    back = plan_changes(diff(LBState.of(new), LBState.of(old)), {}, CFG)
    assert back.pre == "" and cmds(back.reqs) == [ipvs.IPVS_CMD_NEW_DEST]
    assert back.post == f"delete element inet swarmnet-ipvs rejects {{ {VIP} . tcp . 80 }}\n"


def test_draining_keeps_the_destination_with_weight_zero_and_rejects_new_connections() -> None:
    old, new = allports("10.0.1.5"), allports("10.0.1.5", weight=0)
    p = plan_changes(diff(LBState.of(old), LBState.of(new)), {(VIP, "tcp"): M0}, CFG)
    assert cmds(p.reqs) == [ipvs.IPVS_CMD_SET_DEST]
    d = ipvs.parse_attrs(ipvs.parse_attrs(p.reqs[0].attrs[1])[ipvs.IPVS_CMD_ATTR_DEST])
    assert struct.unpack("=I", d[ipvs.DEST_WEIGHT])[0] == 0
    assert p.pre == f"add element inet swarmnet-ipvs rejects-vip {{ {VIP} . tcp }}\n"


def test_a_new_service_without_backends_is_rejected_from_the_start() -> None:
    p = plan_changes(diff(LBState(), LBState.of(allports(proto="udp"))), {}, CFG)
    assert "rejects-vip { 10.0.0.2 . udp }" in p.pre
    assert cmds(p.reqs) == [ipvs.IPVS_CMD_NEW_SERVICE]


def test_full_sync_keeps_marks_deletes_orphans_and_does_not_reuse_a_live_mark() -> None:
    kept, gone, new = allports("10.0.1.5"), allports("10.0.1.6", vip="10.0.0.3"), web("10.0.1.7")
    newap = allports("10.0.1.8", vip="10.0.0.4")
    marks = {(VIP, "tcp"): M0 + 5, ("10.0.0.3", "tcp"): M0}
    p = plan_full(LBState.of(kept, gone), marks, [M0 + 9], LBState.of(kept, new, newap), CFG)
    # the reset keeps the kept mark and drops the removed one; the new one comes after IPVS
    assert f"{VIP} . tcp : {M0 + 5:#x}" in p.pre and "10.0.0.3" not in p.pre
    assert p.pre.startswith("add table inet swarmnet-ipvs\ndelete table inet swarmnet-ipvs\n")
    assert p.reqs[0] == Req(
        ipvs.IPVS_CMD_DEL_SERVICE,
        (ipvs._fwmark_attr(M0 + 9),),
        ("del orphan fwmark service", M0 + 9),
    )
    assert cmds(p.reqs[1:]) == [ipvs.IPVS_CMD_DEL_SERVICE] + [
        ipvs.IPVS_CMD_NEW_SERVICE, ipvs.IPVS_CMD_NEW_DEST,
    ] * 2  # fmt: skip
    # M0 belonged to the removed service: the new VIP gets M0+1, not a mark still in use
    assert p.post == f"add element inet swarmnet-ipvs marks {{ 10.0.0.4 . tcp : {M0 + 1:#x} }}\n"
    assert p.marks == {(VIP, "tcp"): M0 + 5, ("10.0.0.4", "tcp"): M0 + 1}


def test_full_sync_is_idempotent_and_to_nothing_deletes_the_table() -> None:
    state = LBState.of(allports("10.0.1.5"), web())
    marks = {(VIP, "tcp"): M0}
    p = plan_full(state, marks, [], state, CFG)
    assert p.reqs == [] and p.post == "" and p.marks == marks
    assert f"rejects {{ {VIP} . tcp . 80 }}" in p.pre  # web() has no backend
    empty = plan_full(state, marks, [], LBState(), CFG)
    assert empty.pre == "add table inet swarmnet-ipvs\ndelete table inet swarmnet-ipvs\n"
    assert cmds(empty.reqs) == [ipvs.IPVS_CMD_DEL_SERVICE] * 2 and empty.marks == {}


def test_a_service_whose_ipvs_half_was_lost_is_recreated_with_its_recorded_mark() -> None:
    svc = allports("10.0.1.5")
    p = plan_full(LBState(), {(VIP, "tcp"): M0 + 2}, [], LBState.of(svc), CFG)
    assert attrs_of(p.reqs[0].attrs[0])[ipvs.SVC_FWMARK] == struct.pack("=I", M0 + 2)
    assert f"{M0 + 2:#x}" in p.pre and p.post == ""


# ---- the owned table -------------------------------------------------------------------


def test_the_table_marks_in_one_map_lookup_and_rejects_only_new_connections() -> None:
    text = ipvs.render_reset({(VIP, "udp"): M0}, [allports()], CFG)
    for hook in ("prerouting", "output"):
        assert (
            f"add chain inet swarmnet-ipvs {hook} "
            f"{{ type filter hook {hook} priority mangle; policy accept; }}"
        ) in text
        assert (
            f"add rule inet swarmnet-ipvs {hook} meta mark set ip daddr . meta l4proto map @marks"
            in text
        )
        assert text.count(f"{hook} ct state new ip daddr") == 4
    assert "add map inet swarmnet-ipvs marks { type ipv4_addr . inet_proto : mark; }" in text
    assert f"add element inet swarmnet-ipvs marks {{ {VIP} . udp : {M0:#x} }}" in text
    assert f"add element inet swarmnet-ipvs rejects-vip {{ {VIP} . tcp }}" in text
    # rejects come before the mark: a refused packet is never handed to IPVS
    assert text.index("@rejects-vip reject") < text.index("meta mark set")


def test_marks_are_read_back_from_nft_json() -> None:
    doc = {"nftables": [
        {"metainfo": {"json_schema_version": 1}},
        {"table": {"family": "inet", "name": "swarmnet-ipvs"}},
        {"map": {"family": "inet", "name": "marks", "table": "swarmnet-ipvs",
                 "type": ["ipv4_addr", "inet_proto"], "map": "mark",
                 "elem": [[{"concat": [VIP, "tcp"]}, M0], [{"concat": ["10.0.0.3", 17]}, M0 + 1]]}},
        {"set": {"family": "inet", "name": "rejects", "table": "swarmnet-ipvs"}},
    ]}  # fmt: skip
    assert ipvs.parse_marks(doc) == {(VIP, "tcp"): M0, ("10.0.0.3", "udp"): M0 + 1}
    assert ipvs.parse_marks({"nftables": []}) == {}


# ---- choosing a backend -----------------------------------------------------------------


class _Fake:
    def __init__(self, netns=None) -> None:
        self.netns = netns


@pytest.fixture
def fake_backends(monkeypatch):
    """Record the backend classes choose_backend builds, without a kernel."""
    from swarmnet.lb import nft

    probes: list = []
    monkeypatch.setattr(ipvs, "IpvsBackend", type("IpvsBackend", (_Fake,), {"name": "ipvs"}))
    monkeypatch.setattr(nft, "NftBackend", type("NftBackend", (_Fake,), {"name": "nft"}))

    def with_ipvs(has: bool) -> list:
        def fake(modprobe=True, netns=None):
            probes.append(netns)
            return has

        monkeypatch.setattr(lb_backend, "ipvs_available", fake)
        return probes

    return with_ipvs


@pytest.mark.parametrize("has, expect", [(True, "ipvs"), (False, "nft")])
def test_auto_picks_ipvs_where_the_namespace_has_it(fake_backends, has, expect) -> None:
    probes = fake_backends(has)
    got = lb_backend.choose_backend("auto", "sntest-x")
    assert (got.name, got.netns, probes) == (expect, "sntest-x", ["sntest-x"])


def test_forcing_ipvs_without_it_is_a_clear_error_and_nft_never_probes(fake_backends) -> None:
    probes = fake_backends(False)
    with pytest.raises(lb_backend.BackendUnavailable, match="no IPVS in network namespace ns1"):
        lb_backend.choose_backend("ipvs", "ns1")
    assert lb_backend.choose_backend("nft", "ns1").name == "nft" and probes == ["ns1"]
    with pytest.raises(ValueError):
        lb_backend.choose_backend("lvs")  # type: ignore[arg-type]


def test_on_this_host_the_probe_agrees_with_the_kernel_and_auto_follows_it() -> None:
    """The real probe (a generic-netlink family lookup needs no privilege) in this process's
    own namespace: the build machine has no IPVS, so auto gives nft and ipvs is refused."""
    import os

    has = ipvs.probe()
    assert has == os.path.exists("/proc/net/ip_vs")  # module loaded <=> its proc file
    if has:
        pytest.skip("this kernel has IPVS: the VM test covers auto -> ipvs")
    assert not lb_backend.ipvs_available(modprobe=False)
    got = lb_backend.choose_backend("auto")
    try:
        assert got.name == "nft"
    finally:
        got.close()
    with pytest.raises(lb_backend.BackendUnavailable):
        lb_backend.choose_backend("ipvs")
