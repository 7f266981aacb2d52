"""Table tests of the pure LB planner: validation, canonical values, diff, slots, names,
the nftables transaction as data, and its netlink encoding (golden bytes from nft)."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from swarmnet.lb import nft_netlink, plan
from swarmnet.lb.nft import NftConfig, render, service_rule
from swarmnet.lb.plan import Backend, LBError, LBService, LBState, diff

B1, B2, B3 = Backend("10.0.1.5", 80), Backend("10.0.1.6", 80), Backend("10.0.1.7", 80, 2)


def svc(*backends: Backend, vip: str = "10.0.0.2", proto: str = "tcp", port: int = 80):
    return LBService(vip, proto, port, tuple(backends))


@pytest.mark.parametrize(
    "make, field",
    [
        (lambda: Backend("10.0.1.300", 80), "backend"),
        # Port 0 is the all-ports mode (issue 6): valid alone, refused when mixed.
        (lambda: LBService("10.0.0.2", "tcp", 80, (Backend("10.0.1.5", 0),)), "all-ports"),
        (lambda: LBService("10.0.0.2", "tcp", 0, (Backend("10.0.1.5", 80),)), "all-ports"),
        (lambda: Backend("10.0.1.5", -1), "port"),
        (lambda: Backend("10.0.1.5", 70000), "port"),
        (lambda: Backend("10.0.1.5", 80, -1), "weight"),
        (lambda: Backend("10.0.1.5", 80, plan.WEIGHT_MAX + 1), "weight"),
        (lambda: LBService("fe80::1", "tcp", 80), "vip"),
        (lambda: LBService("10.0.0.2", "sctp", 80), "protocol"),
        (lambda: LBService("10.0.0.2", "tcp", True), "port"),
        (lambda: svc(B1, Backend("10.0.1.5", 80, 3)), "listed twice"),
        (lambda: LBState.of(svc(B1), svc(B2)), "listed twice"),
    ],
)
def test_bad_input_is_rejected_naming_the_field(make, field: str) -> None:
    with pytest.raises(LBError, match=field):
        make()


def test_backends_are_canonical_so_equal_services_compare_equal() -> None:
    assert svc(B2, B1) == svc(B1, B2)
    assert svc(B2, B1).backends == (B1, B2)
    assert LBState.of(svc(B1), svc(B1, port=81)) == LBState.of(svc(B1, port=81), svc(B1))


def test_diff_added_changed_removed_sorted() -> None:
    a, b, c = svc(B1), svc(B1, port=81), svc(B2, vip="10.0.0.3")
    old = LBState.of(a, b)
    new = LBState.of(svc(B1, B2), c)
    ch = diff(old, new)
    assert ch.added == (c,)
    assert ch.changed == ((a, svc(B1, B2)),)
    assert ch.removed == (b,)
    assert len(ch) == 3 and not ch.empty
    assert diff(new, new).empty


def test_backend_diff() -> None:
    d = plan.backend_diff(svc(B1, B2), svc(Backend("10.0.1.6", 80, 5), B3))
    assert d.added == (B3,) and d.removed == (B1,) and d.reweighted == (Backend("10.0.1.6", 80, 5),)


def test_slots_follow_weights_and_skip_drained() -> None:
    total, sl = plan.slots(svc(B1, Backend("10.0.1.6", 80, 0), B3))
    assert total == 3
    assert [(s.lo, s.hi, s.backend.ip) for s in sl] == [(0, 0, "10.0.1.5"), (1, 2, "10.0.1.7")]
    assert plan.slots(svc()) == (0, ())
    assert plan.slots(svc(Backend("10.0.1.6", 80, 0))) == (0, ())


@given(st.lists(st.integers(0, plan.WEIGHT_MAX), min_size=0, max_size=20))
def test_slots_partition_the_numgen_range(weights: list[int]) -> None:
    s = svc(*(Backend(f"10.0.2.{i + 1}", 80, w) for i, w in enumerate(weights)))
    total, sl = plan.slots(s)
    assert total == sum(weights)
    covered = [v for x in sl for v in range(x.lo, x.hi + 1)]
    assert covered == list(range(total))  # contiguous, no overlap, no gap


def test_chain_names_are_deterministic_owned_and_short() -> None:
    n = plan.chain_name(("10.0.0.2", "tcp", 80))
    assert n == plan.chain_name(("10.0.0.2", "tcp", 80))
    assert n != plan.chain_name(("10.0.0.2", "udp", 80))
    assert plan.is_chain_name(n) and len(n) == 20
    assert not plan.is_chain_name("prerouting") and not plan.is_chain_name("svc-UPPERCASE12345")


def test_nft_changes_touch_only_changed_services() -> None:
    keep, grow, gone = svc(B1), svc(B1, port=81), svc(B1, port=82)
    new_grow, added = svc(B1, B2, port=81), svc(B3, port=83)
    ops = plan.nft_changes(diff(LBState.of(keep, grow, gone), LBState.of(keep, new_grow, added)))
    gname, cname, aname = (plan.chain_name(s.key) for s in (gone, new_grow, added))
    assert ops == [
        plan.DelElem(gone.key), plan.FlushChain(gname), plan.DelChain(gname),
        plan.FlushChain(cname), plan.AddServiceRule(cname, new_grow),
        plan.AddChain(aname), plan.AddServiceRule(aname, added), plan.AddElem(added.key, aname),
    ]  # fmt: skip
    assert all(plan.chain_name(keep.key) not in repr(op) for op in ops)


def test_nft_rendering() -> None:
    assert service_rule(svc(B1, B3)) == (
        "meta l4proto tcp dnat ip to numgen random mod 3 map "
        "{ 0 : 10.0.1.5 . 80, 1-2 : 10.0.1.7 . 80 }"
    )
    assert service_rule(svc(proto="udp")) == "counter"  # the rejects set answers first
    text = render(plan.nft_full(LBState.of(svc(B1))), NftConfig(table="t"))
    assert text.splitlines()[:3] == ["add table inet t", "delete table inet t", "add table inet t"]
    assert "add element inet t services { 10.0.0.2 . tcp . 80 : goto svc-" in text


def test_diff_equality_is_by_value_not_identity() -> None:
    """``diff`` compares services by one precomputed string: equal values built apart are
    unchanged, and every field of every backend counts."""
    a = LBState.of(svc(B1, B2), svc(B3, port=81))
    same = LBState.of(svc(B2, B1), svc(Backend("10.0.1.7", 80, 2), port=81))
    assert diff(a, same).empty and a == same and hash(a.sorted()[0]) == hash(same.sorted()[0])
    for other in (Backend("10.0.1.6", 81), Backend("10.0.1.6", 80, 2), Backend("10.0.1.8", 80)):
        ch = diff(a, LBState.of(svc(B1, other), svc(B3, port=81)))
        assert ch.changed == ((svc(B1, B2), svc(B1, other)),) and not ch.added and not ch.removed
    assert svc(B1) != svc(B1, port=81) != svc(B1, proto="udp", port=81)


# What nft 1.0.6 sends for ``render`` of the same ops (``nft --debug=mnl -f``, table ``t``),
# without netlink headers. Normalised: the anonymous map"s batch-local id is 1 (nft numbers
# it from its cache), and the id nft also puts on a NAMED set"s elements is left out (the
# kernel looks a named set up by name; nft"s number is an index in its own cache).
NFT_GOLDEN: dict[str, list[tuple[int, str]]] = {
    "ranges": [
        (
            9,
            "0100000006000100740000000c0002005f5f6d6170256400080003000000000f0800040000000004"
            "080005000000000408000600000001cd080007000000000808000a00000000010c00098008000100"
            "0000000416000d000004010000000104000000000604000000000000",
        ),
        (
            12,
            "0100000006000100740000000c0002005f5f6d617025640008000400000000015c00038020000180"
            "0c0001800800010000000000100002800c0001000a00010500500000200002800c00018008000100"
            "00000001100002800c0001000a000107005000001800038008000300000000010c00018008000100"
            "00000003",
        ),
        (
            6,
            "0100000006000100740000000a0002007376632d610000003001048024000180090001006d657461"
            "0000000014000280080002000000001008000100000000012c00018008000100636d700020000280"
            "080001000000000108000200000000000c0003800500010006000000340001800b0001006e756d67"
            "656e0000240002800800010000000001080002000000000308000300000000010800040000000000"
            "400001800e000100627974656f726465720000002c00028008000100000000010800020000000001"
            "080003000000000108000400000000040800050000000004380001800b0001006c6f6f6b75700000"
            "28000280080002000000000108000300000000010c0001005f5f6d61702564000800040000000001"
            "30000180080001006e61740024000280080001000000000108000200000000020800030000000001"
            "0800050000000009",
        ),
    ],
    "hash": [
        (
            9,
            "0100000006000100740000000c0002005f5f6d6170256400080003000000000b0800040000000004"
            "080005000000000408000600000001cd080007000000000808000a00000000010c00098008000100"
            "0000000216000d000004010000000104000000000604000000000000",
        ),
        (
            12,
            "0100000006000100740000000c0002005f5f6d617025640008000400000000014400038020000180"
            "0c0001800800010000000000100002800c0001000a00010500500000200002800c00018008000100"
            "01000000100002800c0001000a00010700500000",
        ),
        (
            6,
            "0100000006000100740000000a0002007376632d61000000f000048024000180090001006d657461"
            "0000000014000280080002000000001008000100000000012c00018008000100636d700020000280"
            "080001000000000108000200000000000c0003800500010006000000340001800b0001006e756d67"
            "656e0000240002800800010000000001080002000000000208000300000000010800040000000000"
            "380001800b0001006c6f6f6b7570000028000280080002000000000108000300000000010c000100"
            "5f5f6d6170256400080004000000000130000180080001006e617400240002800800010000000001"
            "080002000000000208000300000000010800050000000009",
        ),
    ],
    "allports": [
        (
            9,
            "0100000006000100740000000c0002005f5f6d6170256400080003000000000f0800040000000004"
            "08000500000000040800060000000007080007000000000408000a00000000010c00098008000100"
            "0000000416000d000004010000000104020000000604000000000000",
        ),
        (
            12,
            "0100000006000100740000000c0002005f5f6d61702564000800040000000001540003801c000180"
            "0c00018008000100000000000c000280080001000a0001051c0002800c0001800800010000000001"
            "0c000280080001000a0001071800038008000300000000010c0001800800010000000003",
        ),
        (
            6,
            "0100000006000100740000000a0002007376632d610000002801048024000180090001006d657461"
            "0000000014000280080002000000001008000100000000012c00018008000100636d700020000280"
            "080001000000000108000200000000000c0003800500010011000000340001800b0001006e756d67"
            "656e0000240002800800010000000001080002000000000308000300000000010800040000000000"
            "400001800e000100627974656f726465720000002c00028008000100000000010800020000000001"
            "080003000000000108000400000000040800050000000004380001800b0001006c6f6f6b75700000"
            "28000280080002000000000108000300000000010c0001005f5f6d61702564000800040000000001"
            "28000180080001006e6174001c000280080001000000000108000200000000020800030000000001",
        ),
    ],
    "objects": [
        (8, "0100000006000100740000000a0002007376632d61000000"),
        (
            6,
            "0100000006000100740000000a0002007376632d6100000018000480140001800c000100636f756e"
            "7465720004000280",
        ),
        (3, "0100000006000100740000000a0003007376632d62000000"),
        (
            12,
            "0100000006000100740000000d000200736572766963657300000000380003803400018014000180"
            "100001000a00000206000000005000001c0002801800028008000100fffffffc0a0002007376632d"
            "61000000",
        ),
        (
            12,
            "0100000006000100740000000900020076697073000000003400038030000180100001800c000100"
            "0a000002060000001c0002801800028008000100fffffffc0a0002007376632d61000000",
        ),
        (
            12,
            "0100000006000100740000000c00020072656a65637473001c000380180001801400018010000100"
            "0a0000031100000000350000",
        ),
        (
            14,
            "0100000006000100740000000c00020072656a65637473001c000380180001801400018010000100"
            "0a0000031100000000350000",
        ),
        (
            12,
            "0100000006000100740000001000020072656a656374732d76697000180003801400018010000180"
            "0c0001000a00000311000000",
        ),
        (
            14,
            "0100000006000100740000000d0002007365727669636573000000001c0003801800018014000180"
            "100001000a0000020600000000500000",
        ),
        (5, "0100000006000100740000000a0003007376632d62000000"),
    ],
}

B5, B7 = Backend("10.0.1.5", 80), Backend("10.0.1.7", 80)
NETLINK_CASES = {
    "ranges": [plan.AddServiceRule("svc-a", svc(B5, Backend("10.0.1.7", 80, 2)))],
    "hash": [plan.AddServiceRule("svc-a", svc(B5, B7))],
    "allports": [
        plan.AddServiceRule(
            "svc-a", svc(Backend("10.0.1.5", 0), Backend("10.0.1.7", 0, 2), proto="udp", port=0)
        )
    ],
    "objects": [
        plan.FlushChain("svc-a"),
        plan.AddServiceRule("svc-a", svc(proto="udp", port=53)),
        plan.AddChain("svc-b"),
        plan.AddElem(("10.0.0.2", "tcp", 80), "svc-a"),
        plan.AddElem(("10.0.0.2", "tcp", 0), "svc-a"),
        plan.AddReject(("10.0.0.3", "udp", 53)),
        plan.DelReject(("10.0.0.3", "udp", 53)),
        plan.AddReject(("10.0.0.3", "udp", 0)),
        plan.DelElem(("10.0.0.2", "tcp", 80)),
        plan.DelChain("svc-b"),
    ],
}


def _split(batch: bytes) -> list[tuple[int, int, int, bytes]]:
    out, off = [], 0
    while off < len(batch):
        n, kind, flags, seq, _pid = struct.unpack_from("=IHHII", batch, off)
        out.append((kind, flags, seq, batch[off + 16 : off + n]))
        off += n
    return out


@pytest.mark.parametrize("case", sorted(NETLINK_CASES))
def test_netlink_batch_is_what_nft_sends(case: str) -> None:
    ops = NETLINK_CASES[case]
    batch, by_seq = nft_netlink.encode(ops, "t", "services", "vips", seq=7)
    msgs = _split(batch)
    begin, *body, end = msgs
    assert (begin[0], begin[2], end[0], end[2]) == (0x10, 7, 0x11, 7 + len(body) + 1)
    assert begin[3] == end[3] == bytes([0, 0, 0, 10])  # AF_UNSPEC, res_id NFNL_SUBSYS_NFTABLES
    assert [(k & 0xFF, body.hex()) for k, _f, _s, body in body] == [
        (t, h) for t, h in NFT_GOLDEN[case]
    ]
    assert all(k >> 8 == 10 and f & 1 for k, f, _s, _b in body)  # nftables, NLM_F_REQUEST
    acks = [f & 4 for _k, f, _s, _b in body]
    assert acks == [0] * (len(body) - 1) + [4]  # only the last asks for an ACK
    # every message maps back to the op it came from (a refused message names its op)
    assert set(by_seq) == {s for _k, _f, s, _b in body}
    assert sorted(set(by_seq.values()), key=ops.index) == ops


def test_netlink_refuses_a_full_load() -> None:
    with pytest.raises(AssertionError, match="not an incremental op"):
        nft_netlink.encode([plan.ResetTable()], "t", "services", "vips")
