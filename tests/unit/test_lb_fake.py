"""The fake backend: same transactions as nftables, kernel semantics, and a packet tracer."""

from __future__ import annotations

import errno
import random

import pytest

from swarmnet.kernel.errors import KernelError
from swarmnet.lb import plan
from swarmnet.lb.fake import FakeBackend, Trace
from swarmnet.lb.plan import Backend, LBService, LBState

VIP = "10.0.0.2"


def web(*ips: str, weight: int = 1) -> LBService:
    return LBService(VIP, "tcp", 80, tuple(Backend(ip, 80, weight) for ip in ips))


def test_vip_reaches_every_backend_and_only_them() -> None:
    lb = FakeBackend()
    lb.sync(LBState.of(web("10.0.1.5", "10.0.1.6")))
    assert lb.trace("10.0.1.9", VIP, "tcp", 80) == {"10.0.1.5:80", "10.0.1.6:80"}
    assert lb.trace("10.0.1.9", VIP, "udp", 80) == frozenset()  # other protocol: untouched
    assert lb.trace("10.0.1.9", VIP, "tcp", 81) == frozenset()
    assert lb.trace_verdict("10.0.1.9", "10.0.0.3", "tcp", 80) == Trace("accept")


def test_removing_a_backend_is_one_small_transaction() -> None:
    lb = FakeBackend()
    other = LBService("10.0.0.3", "udp", 53, (Backend("10.0.1.7", 53),))
    lb.sync(LBState.of(web("10.0.1.5", "10.0.1.6"), other))
    lb.sync(LBState.of(web("10.0.1.6"), other))
    assert lb.trace("c", VIP, "tcp", 80) == {"10.0.1.6:80"}
    assert lb.trace("c", "10.0.0.3", "udp", 53) == {"10.0.1.7:53"}
    name = plan.chain_name(web().key)
    assert lb.last_transaction == [
        plan.FlushChain(name),
        plan.AddServiceRule(name, web("10.0.1.6")),
    ]
    assert len(lb.transactions) == 2  # one full sync, then one transaction


def test_no_live_backend_rejects_instead_of_black_holing() -> None:
    lb = FakeBackend()
    lb.sync(LBState.of(web("10.0.1.5", weight=0)))
    assert lb.trace_verdict("c", VIP, "tcp", 80) == Trace("reject")
    lb.sync(LBState.of(web()))
    assert lb.trace_verdict("c", VIP, "tcp", 80) == Trace("reject")


def test_service_removal_and_dump_round_trip() -> None:
    lb = FakeBackend()
    s = LBState.of(web("10.0.1.5", "10.0.1.6"), LBService("10.0.0.3", "udp", 53, ()))
    lb.sync(s)
    assert lb.dump() == s
    lb.sync(LBState.of(LBService("10.0.0.3", "udp", 53, ())))
    assert lb.trace("c", VIP, "tcp", 80) == frozenset()
    assert lb.table is not None and len(lb.table.chains) == 1  # the removed chain is gone


def test_failure_forgets_applied_state_and_next_sync_is_full() -> None:
    lb = FakeBackend()
    lb.sync(LBState.of(web("10.0.1.5")))
    lb.fail_next = KernelError(errno.EIO, "injected")
    with pytest.raises(KernelError):
        lb.sync(LBState.of(web("10.0.1.6")))
    assert lb.trace("c", VIP, "tcp", 80) == {"10.0.1.5:80"}  # nothing half-applied
    lb.sync(LBState.of(web("10.0.1.6")))
    assert isinstance(lb.last_transaction[0], plan.ResetTable)
    assert lb.trace("c", VIP, "tcp", 80) == {"10.0.1.6:80"}


def test_kernel_semantics_reject_wrong_order() -> None:
    lb = FakeBackend()
    lb.sync(LBState.of(web("10.0.1.5")))
    name = plan.chain_name(web().key)
    with pytest.raises(KernelError) as e:
        lb.run([plan.FlushChain(name), plan.DelChain(name)])  # still referenced by the map
    assert e.value.code == errno.EBUSY
    with pytest.raises(KernelError) as e:
        lb.run([plan.DelElem(("10.9.9.9", "tcp", 1))])
    assert e.value.is_not_found()
    assert lb.trace("c", VIP, "tcp", 80) == {"10.0.1.5:80"}  # failed transactions left no trace


def test_random_change_sequences_match_a_fresh_full_sync() -> None:
    """Whatever path of incremental syncs, the table equals a full sync of the final state."""
    rng = random.Random(6)
    lb = FakeBackend()
    for _ in range(200):
        services = []
        for v in rng.sample(range(2, 12), rng.randint(0, 6)):
            ips = rng.sample(range(5, 15), rng.randint(0, 4))
            bes = tuple(Backend(f"10.0.1.{i}", 80, rng.randint(0, 3)) for i in ips)
            services.append(LBService(f"10.0.0.{v}", rng.choice(plan.PROTOS), 80, bes))
        state = LBState(frozenset(services))
        lb.sync(state)
        fresh = FakeBackend()
        fresh.full_sync(state)
        assert lb.table == fresh.table
        assert lb.dump() == state.without_drained()
        for s in services:
            expect = {b.addr for b in s.live}
            assert lb.trace("c", s.vip, s.proto, s.port) == expect
