"""The overlay reconciler against the in-memory FakeKernel: convergence, idempotence, crash
recovery, ownership."""

from __future__ import annotations

import errno
from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from swarmnet.kernel.errors import KernelError
from swarmnet.kernel.fake import FakeKernel
from swarmnet.kernel.types import (
    BridgeAdd,
    KernelState,
    LinkDel,
    NetnsAdd,
    Op,
    VethAdd,
)
from swarmnet.overlay.plan import (
    LocalAttachment,
    NodeOverlay,
    OverlayNetwork,
    RemoteEndpoint,
    desired,
    mac_for_ip,
    plan,
    sandbox_name,
)
from swarmnet.overlay.reconciler import EntryGuard, OverlayReconciler, RemotesRead

VTEP = "198.51.100.1"
PREFIX = "sn-n1-"
NETS = (
    OverlayNetwork("net1", "front", 4242, "10.9.0.0/24"),
    OverlayNetwork("net2", "back", 4243, "10.9.1.0/24"),
)


def sb(task: str) -> str:
    return sandbox_name(PREFIX, task)


def node(
    attachments: tuple[LocalAttachment, ...] = (),
    remotes: tuple[RemoteEndpoint, ...] = (),
    sandboxes: tuple[str, ...] | None = None,
    mtu: int = 1500,
) -> NodeOverlay:
    if sandboxes is None:
        sandboxes = tuple(sorted({a.netns for a in attachments}))
    return NodeOverlay(VTEP, mtu, NETS, sandboxes, attachments, remotes, PREFIX)


A1 = LocalAttachment("t1", "net1", "10.9.0.2/24", sb("t1"), "eth0")
A2 = LocalAttachment("t2", "net1", "10.9.0.3/24", sb("t2"), "eth0")
A3 = LocalAttachment("t2", "net2", "10.9.1.3/24", sb("t2"), "eth1")
R1 = RemoteEndpoint("net1", "10.9.0.10", "198.51.100.2")
R2 = RemoteEndpoint("net1", "10.9.0.11", "198.51.100.3")
R3 = RemoteEndpoint("net2", "10.9.1.10", "198.51.100.2")
FULL = node((A1, A2, A3), (R1, R2, R3))


def _no_mac(state: KernelState, keep_mac: bool) -> KernelState:
    links = {n: lk if keep_mac else replace(lk, mac=None) for n, lk in state.links.items()}
    return KernelState(links, state.addrs, state.routes, state.fdb, state.neigh)


def assert_matches_desired(k: FakeKernel, n: NodeOverlay) -> None:
    """The kernel holds what desired(n) says, for everything we own."""
    want = desired(n)
    base = k.snapshot()
    ours = {name: lk for name, lk in base.links.items() if name.startswith("sn-")}
    assert {name: replace(lk, mac=None) for name, lk in ours.items()} == want.base.links
    assert base.fdb == want.base.fdb and base.neigh == want.base.neigh
    owned = {ns for ns in k.list_netns() if ns.startswith(PREFIX + "t-")}
    assert owned == {s for s in want.sandboxes if s.startswith(PREFIX + "t-")}
    for name, w in want.sandboxes.items():
        got = k.snapshot(name)
        assert got.links["lo"].up
        for ifname, lk in w.links.items():
            if ifname != "lo":
                assert got.links[ifname] == lk
        assert {a for a in got.addrs if a.dev != "lo"} == w.addrs


def test_apply_twice_second_pass_is_empty() -> None:
    k = FakeKernel()
    r = OverlayReconciler(k)
    ops = r.reconcile(FULL)
    assert ops and k.ops_applied == ops
    assert_matches_desired(k, FULL)
    assert r.reconcile(FULL) == []
    assert (r.passes, r.ops_applied, r.errors) == (2, len(ops), 0)


def test_half_applied_state_is_finished_by_the_next_pass() -> None:
    # Every crash point of a from-scratch pass, and of a transition between two states.
    transitions = [(node(), FULL), (FULL, node((A1, A3), (R2,)))]
    for before, after in transitions:
        k0 = FakeKernel()
        OverlayReconciler(k0).reconcile(before)
        ops = plan(after, k0.snapshot(), k0.list_netns(), _sandboxes(k0, after))
        assert ops
        for cut in range(len(ops)):
            k = FakeKernel()
            OverlayReconciler(k).reconcile(before)
            k.apply(ops[:cut])  # the crash: only a prefix was applied
            r = OverlayReconciler(k)
            r.reconcile(after)
            assert r.errors == 0, f"cut at {cut}: {ops[cut]}"
            assert_matches_desired(k, after)
            assert r.reconcile(after) == []


def _sandboxes(k: FakeKernel, n: NodeOverlay) -> dict[str, KernelState]:
    return {s: k.snapshot(s) for s in desired(n).sandboxes if s in k.list_netns()}


def test_network_removal_leaves_nothing_of_ours_and_keeps_foreign_links() -> None:
    k = FakeKernel()
    k.apply(
        [
            BridgeAdd("docker0", 1500),
            VethAdd("vethfore", "vethforp", 1500),
            NetnsAdd("sntest-foreign"),
        ]
    )
    r = OverlayReconciler(k)
    r.reconcile(FULL)
    foreign_before = {n: lk for n, lk in k.snapshot().links.items() if not n.startswith("sn-")}
    r.reconcile(node())
    base = k.snapshot()
    assert not [n for n in base.links if n.startswith("sn-")]
    assert base.fdb == set() and base.neigh == set()
    assert {n: lk for n, lk in base.links.items() if not n.startswith("sn-")} == foreign_before
    assert k.list_netns() == {"sntest-foreign"}
    assert r.reconcile(node()) == []


def test_removing_remote_and_changing_vtep_on_fake() -> None:
    k = FakeKernel()
    r = OverlayReconciler(k)
    r.reconcile(FULL)
    moved = replace(R1, vtep="198.51.100.9")
    n = node((A1, A2, A3), (moved, R3))
    r.reconcile(n)
    base = k.snapshot()
    assert {(e.mac, e.dst) for e in base.fdb if e.dev == "sn-vx-4242"} == {
        (mac_for_ip(R1.ip), "198.51.100.9")
    }
    assert {e.ip for e in base.neigh} == {R1.ip, R3.ip}
    assert r.reconcile(n) == []


def test_mtu_change_converges() -> None:
    k = FakeKernel()
    r = OverlayReconciler(k)
    r.reconcile(FULL)
    smaller = replace(FULL, underlay_mtu=1400)
    assert r.reconcile(smaller)
    assert_matches_desired(k, smaller)
    assert r.reconcile(smaller) == []


class FlakyKernel(FakeKernel):
    """Fails the ``fail_at``-th op of the next ``failures`` apply calls (the ops before it
    stay applied, as the Kernel contract says)."""

    def __init__(self, failures: int, fail_at: int) -> None:
        super().__init__()
        self.failures = failures
        self.fail_at = fail_at

    def apply(self, ops: list[Op]) -> None:
        if self.failures and len(ops) > self.fail_at:
            self.failures -= 1
            super().apply(ops[: self.fail_at])
            raise KernelError(errno.EBUSY, ops[self.fail_at], "injected")
        super().apply(ops)


def test_kernel_error_is_retried_once_on_a_fresh_snapshot() -> None:
    k = FlakyKernel(failures=1, fail_at=3)
    r = OverlayReconciler(k)
    ops = r.reconcile(FULL)
    assert ops == k.ops_applied  # the 3 accepted before the error, then the retry's
    assert (r.passes, r.errors, r.stats.retries) == (1, 1, 1)
    assert r.ops_applied == len(k.ops_applied)
    assert_matches_desired(k, FULL)


def test_second_kernel_error_is_raised() -> None:
    k = FlakyKernel(failures=2, fail_at=1)
    r = OverlayReconciler(k)
    with pytest.raises(KernelError):
        r.reconcile(FULL)
    assert r.errors == 2 and r.ops_applied == 2
    assert r.reconcile(FULL)  # the next pass converges
    assert_matches_desired(k, FULL)


def test_outside_damage_is_repaired() -> None:
    k = FakeKernel()
    r = OverlayReconciler(k)
    r.reconcile(FULL)
    k.apply([LinkDel("sn-br-4243")])  # an operator deletes a bridge: ports are released
    k.apply([LinkDel("eth0", netns=sb("t1"))])  # and a task's interface (its pair goes too)
    assert r.reconcile(FULL)
    assert_matches_desired(k, FULL)
    assert r.reconcile(FULL) == []


# ---- property: any state to any state, in one pass ------------------------------------

_tasks = ["t1", "t2", "t3"]
_att_pool = [
    LocalAttachment(t, net.id, f"10.9.{j}.{i + 2}/24", sb(t), f"eth{j}")
    for i, t in enumerate(_tasks)
    for j, net in enumerate(NETS)
]
_rem_pool = [
    RemoteEndpoint(net.id, f"10.9.{j}.{50 + i}", f"198.51.100.{2 + v}")
    for j, net in enumerate(NETS)
    for i in range(3)
    for v in range(2)
]
_nodes = st.builds(
    lambda atts, rems, extra, mtu: node(
        tuple(atts), tuple(rems), tuple(sorted({a.netns for a in atts} | set(extra))), mtu
    ),
    st.lists(st.sampled_from(_att_pool), unique=True),
    st.lists(st.sampled_from(_rem_pool), unique=True),
    st.lists(st.sampled_from([sb("t4"), sb("t1")]), unique=True),
    st.sampled_from([1500, 1400]),
)


@settings(max_examples=150, deadline=None)
@given(st.lists(_nodes, min_size=1, max_size=4))
def test_any_sequence_of_states_converges_in_one_pass(seq: list[NodeOverlay]) -> None:
    k = FakeKernel()
    k.apply([BridgeAdd("foreign0", 1500)])
    foreign = k.snapshot().links["foreign0"]
    r = OverlayReconciler(k)
    for n in seq:
        r.reconcile(n)
        assert r.errors == 0
        assert_matches_desired(k, n)
        assert r.reconcile(n) == []
    assert k.snapshot().links["foreign0"] == foreign


# ---- the fast path racing a full pass (EntryGuard) ------------------------------------


class RacingKernel(FakeKernel):
    """Runs a one-shot callback at a chosen point of the next full pass: right after its
    base snapshot was taken ("snapshot": the snapshot no longer describes the kernel) or
    right after its first apply (the links before its FDB/neighbour tail, "head")."""

    def __init__(self) -> None:
        super().__init__()
        self.at: str | None = None
        self.race = lambda: None

    def _fire(self, point: str) -> None:
        if self.at == point:
            self.at = None
            self.race()

    def snapshot(self, netns: str | None = None) -> KernelState:
        state = super().snapshot(netns)
        if netns is None:
            self._fire("snapshot")
        return state

    def apply(self, ops: list[Op]) -> None:
        super().apply(ops)
        self._fire("head")


def _guarded(
    first: tuple[RemoteEndpoint, ...],
) -> tuple[RacingKernel, EntryGuard, OverlayReconciler]:
    k = RacingKernel()
    guard = EntryGuard()
    r = OverlayReconciler(k, guard)
    guard.offer(RemotesRead(1, first))
    r.reconcile(node((A1, A2, A3), first))
    return k, guard, r


def test_delta_after_the_full_pass_snapshot_is_not_undone() -> None:
    """The full pass read [R1] and snapshotted; then the fast path moved R1 away and added
    R2 (a newer read). Planning from its own read and snapshot, the full pass would re-add
    R1's entries and delete R2's; it must plan again and leave the newer state."""
    k, guard, r = _guarded(())
    guard.offer(RemotesRead(2, (R1,)))
    newer = RemotesRead(3, (R2,))

    def race() -> None:
        guard.offer(newer)
        assert guard.fast_apply(k, newer) == (2, False)

    k.at, k.race = "snapshot", race
    r.reconcile(node((A1, A2, A3), (R1,)))
    assert k.at is None and guard.replans == 1 and r.last_read is newer
    assert_matches_desired(k, node((A1, A2, A3), (R2,)))
    assert guard.model is not None and r._plan(guard.model) == []


def test_an_older_delta_landing_during_the_pass_is_replanned() -> None:
    """The fast path read [R2] before the sync read [R1], but its delta lands in the full
    pass's snapshot window: the newest read is still the pass's own, yet its snapshot is
    stale (R2's entries are not in it). Without a re-plan R2's entries would stay."""
    k, guard, r = _guarded(())
    older = RemotesRead(2, (R2,))
    guard.offer(older)
    guard.offer(RemotesRead(3, (R1,)))

    def race() -> None:
        assert guard.fast_apply(k, older) == (2, False)

    k.at, k.race = "snapshot", race
    r.reconcile(node((A1, A2, A3), (R1,)))
    assert guard.replans == 1
    assert_matches_desired(k, node((A1, A2, A3), (R1,)))
    assert guard.model is not None and r._plan(guard.model) == []


def test_a_failed_pass_leaves_the_fast_path_no_model() -> None:
    """A pass that fails in its links (a VXLAN device may have gone with its entries) must
    not leave a model the fast path would diff against: it falls back to a full pass."""
    k = FlakyKernel(failures=0, fail_at=0)
    guard = EntryGuard()
    r = OverlayReconciler(k, guard)
    guard.offer(RemotesRead(1, (R1,)))
    r.reconcile(node((A1, A2, A3), (R1,)))
    assert guard.model is not None
    k.failures = 2  # both attempts of the next pass fail on their first link op
    with pytest.raises(KernelError):
        r.reconcile(node((A1,), (R1,)))
    assert guard.model is None
    assert guard.fast_apply(k, RemotesRead(2, (R2,))) == (0, True)


def test_a_stale_read_after_the_full_pass_changes_nothing() -> None:
    k, guard, r = _guarded(())
    old = RemotesRead(2, (R1,))
    guard.offer(old)
    guard.offer(RemotesRead(3, (R2,)))
    r.reconcile(node((A1, A2, A3), (R1,)))  # programs the newest read, not its own
    assert guard.fast_apply(k, old) == (0, False)
    assert_matches_desired(k, node((A1, A2, A3), (R2,)))


def test_without_a_model_the_fast_path_asks_for_a_full_pass() -> None:
    k = RacingKernel()
    guard = EntryGuard()
    assert guard.fast_apply(k, RemotesRead(1, (R1,))) == (0, True)
    assert k.snapshot().fdb == set()


_reads = st.lists(st.sampled_from(_rem_pool), unique=True).map(tuple)


@settings(max_examples=200, deadline=None)
@given(
    first=_reads,
    own=_reads,
    racing=st.lists(_reads, max_size=3),
    after=st.lists(_reads, max_size=2),
    at=st.sampled_from(["snapshot", "head", None]),
)
def test_full_pass_and_racing_deltas_end_at_the_newest_read(first, own, racing, after, at):
    """Whatever reads race a full pass, and wherever: once every op has run the kernel holds
    exactly the newest read's entries, and the shared model is what the kernel holds."""
    k, guard, r = _guarded(first)
    seq = iter(range(2, 100))
    guard.offer(RemotesRead(next(seq), own))

    def fast(remotes: tuple[RemoteEndpoint, ...]) -> None:
        read = RemotesRead(next(seq), remotes)
        guard.offer(read)
        n, full = guard.fast_apply(k, read)  # a wrong model would raise here (EEXIST...)
        assert not full

    def race() -> None:
        for remotes in racing:
            fast(remotes)

    k.at, k.race = at, race
    r.reconcile(node((A1, A2, A3), own))
    if at is None:
        race()  # the same reads, after the pass
    for remotes in after:
        fast(remotes)
    assert guard.latest is not None
    assert_matches_desired(k, node((A1, A2, A3), guard.latest.remotes))
    assert guard.model is not None and r._plan(guard.model) == []
