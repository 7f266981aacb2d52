"""Table tests of the pure LB planner: validation, canonical values, diff, slots, names,
and the nftables transaction as data."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from swarmnet.lb import plan
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
