"""The remote-endpoint fast path: ``plan.remote_delta`` as a pure function, checked against the
full planner on a fake kernel (after the delta, a full pass has nothing left to do), the
worker's use of it (kernel-thread model, fallback to a full sync), and the gossip side's
half of it (NetworkDB pushes the owner's own changes to every member at once)."""

from __future__ import annotations

import asyncio
import random
import ssl
import threading
import time
from dataclasses import replace
from pathlib import Path

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from swarmnet.gossip.netdb import MSG_NET_EVENTS, MSG_TABLE_EVENTS, NetDBConfig, NetworkDB, _pack
from swarmnet.kernel import FakeKernel
from swarmnet.kernel.types import FdbAdd, FdbDel, FdbEntry, NeighAdd, NeighDel, NeighEntry
from swarmnet.overlay.plan import (
    LocalAttachment,
    NodeOverlay,
    OverlayNetwork,
    RemoteEndpoint,
    desired,
    mac_for_ip,
    remote_delta,
    vxlan_name,
)
from swarmnet.overlay.reconciler import OverlayReconciler
from swarmnet.worker import Worker, WorkerConfig

NET_A = OverlayNetwork(id="a", name="a", vni=4097, subnet="10.0.1.0/24")
NET_B = OverlayNetwork(id="b", name="b", vni=4098, subnet="10.0.2.0/24")
NET_E = OverlayNetwork(id="e", name="e", vni=4099, subnet="10.0.3.0/24", encrypted=True)
NET_X = OverlayNetwork(id="x", name="x", vni=4100, subnet="10.0.4.0/24")  # no local task
VX_A = vxlan_name(NET_A.vni)


def node(remotes: tuple[RemoteEndpoint, ...] = ()) -> NodeOverlay:
    atts = (
        LocalAttachment("t1", "a", "10.0.1.2/24", "p-t-t1", "eth0"),
        LocalAttachment("t1", "b", "10.0.2.2/24", "p-t-t1", "eth1"),
        LocalAttachment("t2", "e", "10.0.3.2/24", "p-t-t2", "eth0"),
    )
    return NodeOverlay(
        vtep="198.51.100.1",
        underlay_mtu=1500,
        networks=(NET_A, NET_B, NET_E, NET_X),
        sandboxes=("p-t-t1", "p-t-t2"),
        attachments=atts,
        remotes=remotes,
        netns_prefix="p-",
    )


def r(net: str, ip: str, vtep: str = "198.51.100.2") -> RemoteEndpoint:
    return RemoteEndpoint(network_id=net, ip=ip, vtep=vtep)


def fdb(ip: str, vtep: str = "198.51.100.2", dev: str = VX_A) -> FdbEntry:
    return FdbEntry(dev, mac_for_ip(ip), vtep)


def neigh(ip: str, dev: str = VX_A) -> NeighEntry:
    return NeighEntry(dev, ip, mac_for_ip(ip))


def test_add_is_fdb_then_neighbour() -> None:
    ops, new, full = remote_delta(node(), [r("a", "10.0.1.9")])
    assert ops == [FdbAdd(fdb("10.0.1.9")), NeighAdd(neigh("10.0.1.9"))]
    assert new.remotes == (r("a", "10.0.1.9"),)
    assert not full


def test_remove_is_neighbour_then_fdb() -> None:
    ops, new, full = remote_delta(node((r("a", "10.0.1.9"),)), [])
    assert ops == [NeighDel(neigh("10.0.1.9")), FdbDel(fdb("10.0.1.9"))]
    assert new.remotes == ()
    assert not full


def test_moved_vtep_replaces_only_the_fdb_entry() -> None:
    old = node((r("a", "10.0.1.9", "198.51.100.2"),))
    ops, _, _ = remote_delta(old, [r("a", "10.0.1.9", "198.51.100.3")])
    assert ops == [FdbDel(fdb("10.0.1.9")), FdbAdd(fdb("10.0.1.9", "198.51.100.3"))]


def test_same_rules_as_desired_local_ip_own_vtep_lowest_vtep() -> None:
    remotes = [
        r("a", "10.0.1.2"),  # claims a local task's IP: ignored
        r("a", "10.0.1.7", "198.51.100.1"),  # our own VTEP: ignored
        r("a", "10.0.1.8", "198.51.100.4"),
        r("a", "10.0.1.8", "198.51.100.3"),  # two owners: the lowest VTEP wins
    ]
    ops, new, _ = remote_delta(node(), remotes)
    assert ops == [FdbAdd(fdb("10.0.1.8", "198.51.100.3")), NeighAdd(neigh("10.0.1.8"))]
    assert {FdbAdd(e) for e in desired(new).base.fdb} == {o for o in ops if isinstance(o, FdbAdd)}


def test_encrypted_and_non_local_networks_are_left_to_the_full_pass() -> None:
    before = node((r("e", "10.0.3.9"),))
    ops, new, full = remote_delta(before, [r("e", "10.0.3.9", "198.51.100.3")])
    assert ops == [] and full
    assert new.remotes == before.remotes  # the model keeps what the kernel really has
    ops, _, full = remote_delta(node(), [r("x", "10.0.4.9")])
    assert ops == [] and full


def test_unrelated_network_unchanged_needs_no_full_pass() -> None:
    base = node((r("e", "10.0.3.9"), r("a", "10.0.1.9")))
    ops, new, full = remote_delta(base, [r("e", "10.0.3.9"), r("b", "10.0.2.9")])
    assert not full
    assert set(new.remotes) == {r("e", "10.0.3.9"), r("b", "10.0.2.9")}
    assert NeighDel(neigh("10.0.1.9")) in ops
    assert FdbAdd(fdb("10.0.2.9", dev=vxlan_name(NET_B.vni))) in ops


IPS = st.sampled_from([f"10.0.{n}.{h}" for n in (1, 2, 3) for h in (2, 5, 6, 7)])
VTEPS = st.sampled_from(["198.51.100.1", "198.51.100.2", "198.51.100.3"])
NETS = {"1": "a", "2": "b", "3": "e"}
REMOTES = st.lists(
    st.builds(lambda ip, vtep: r(NETS[ip.split(".")[2]], ip, vtep), IPS, VTEPS), max_size=8
)


@settings(max_examples=150, deadline=None)
@given(st.lists(REMOTES, min_size=1, max_size=4), REMOTES)
def test_delta_reaches_what_a_full_pass_would(steps, first) -> None:
    """Reconcile once, then apply only deltas: the kernel accepts every op (the model is
    right), and a full pass afterwards has nothing to do unless the delta said it needs one
    (an encrypted network's remotes changed), and then only that network's entries."""
    k = FakeKernel()
    rec = OverlayReconciler(k)
    model = node(tuple(first))
    rec.reconcile(model)
    for remotes in steps:
        ops, model, full = remote_delta(model, remotes)
        k.apply(ops)  # raises if the model were wrong (EEXIST / ENOENT)
        target = replace(model, remotes=tuple(remotes))
        left = rec._plan(target)
        if not full:
            assert left == []
        assert all(o.entry.dev == vxlan_name(NET_E.vni) for o in left)  # type: ignore[union-attr]
        assert rec._plan(model) == []


# ---------------------------------------------------------------- the worker's fast path


class FakeSupervisor:
    def ensure(self, spec) -> None:
        pass

    async def stop(self, task_id: str, timeout_s: float | None = None) -> None:
        pass

    def pid(self, task_id: str) -> int | None:
        return None

    def tasks(self) -> dict[str, int]:
        return {}

    async def close(self) -> None:
        pass


class Source:
    def __init__(self) -> None:
        self.remotes_now: list[RemoteEndpoint] = []
        self.programmed_calls = 0

    def remotes(self, assignment: dict) -> list[RemoteEndpoint]:
        return list(self.remotes_now)

    def programmed(self) -> None:
        self.programmed_calls += 1


def assignment(encrypted: bool = False) -> dict:
    spec = {"TaskTemplate": {"ContainerSpec": {"Image": "sleep", "Args": ["1000"]}}}
    return {
        "tasks": [
            {
                "id": "t1",
                "name": "s.1",
                "service_name": "s",
                "desired_state": "running",
                "spec": spec,
                "networks": [{"network_id": "a", "address": "10.0.1.2/24"}],
            }
        ],
        "networks": {
            "a": {
                "id": "a",
                "name": "a",
                "vni": 4097,
                "subnet": "10.0.1.0/24",
                "encrypted": encrypted,
            }
        },
    }


@pytest.fixture
def worker(tmp_path: Path):
    k = FakeKernel()
    w = Worker(
        node_id="n1",
        ssl_context=ssl.create_default_context(),
        managers=["198.51.100.9:2377"],
        vtep="198.51.100.1",
        data_dir=tmp_path,
        netns_prefix="p-",
        kernel=k,
    )
    w.supervisor = FakeSupervisor()  # type: ignore[assignment]
    w.endpoints = Source()  # type: ignore[assignment]
    yield w
    w._kx.shutdown(wait=True)


async def wait_for(cond, timeout_s: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not cond():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.01)


async def test_worker_fast_path_programs_without_a_full_pass(worker) -> None:
    src: Source = worker.endpoints
    worker.assignment = assignment()
    await worker.sync()
    passes = worker.reconciler.passes
    src.remotes_now = [r("a", "10.0.1.9")]
    worker.request_sync()
    await wait_for(lambda: worker.fastpath_applied == 1)
    snap = worker.kernel.snapshot(None)
    assert fdb("10.0.1.9") in snap.fdb and neigh("10.0.1.9") in snap.neigh
    assert worker.reconciler.passes == passes and not worker._dirty.is_set()
    assert src.programmed_calls >= 2  # the sync's and the fast path's
    src.remotes_now = []
    worker.request_sync()
    await wait_for(lambda: worker.fastpath_applied == 2)
    snap = worker.kernel.snapshot(None)
    assert fdb("10.0.1.9") not in snap.fdb and neigh("10.0.1.9") not in snap.neigh


async def test_worker_fast_path_falls_back_when_the_kernel_differs(worker) -> None:
    src: Source = worker.endpoints
    worker.assignment = assignment()
    await worker.sync()
    # Someone else added the entry: the fast path's add fails, a full sync is asked for.
    worker.kernel.apply([FdbAdd(fdb("10.0.1.9"))])
    src.remotes_now = [r("a", "10.0.1.9")]
    worker.request_sync()
    await wait_for(lambda: worker.fastpath_fallbacks == 1)
    assert worker._dirty.is_set() and worker.guard.model is None
    await worker.sync()  # the full pass repairs, and the model is back
    snap = worker.kernel.snapshot(None)
    assert neigh("10.0.1.9") in snap.neigh and worker.guard.model is not None


async def test_worker_without_a_pass_or_on_encrypted_network_asks_for_full_sync(worker) -> None:
    src: Source = worker.endpoints
    worker.assignment = assignment(encrypted=True)
    src.remotes_now = [r("a", "10.0.1.9")]
    worker.request_sync()  # no pass yet: nothing known of the kernel
    await wait_for(lambda: worker.fastpath_fallbacks == 1)
    assert worker._dirty.is_set()
    worker._dirty.clear()
    worker.guard.model = replace(node(), remotes=())  # as if reconciled (encrypted "e")
    src.remotes_now = [r("e", "10.0.3.9")]
    worker.request_sync()
    await wait_for(lambda: worker.fastpath_fallbacks == 2)
    assert worker._dirty.is_set()


async def test_sync_with_only_remote_changes_is_a_delta_and_resync_s_forces_a_pass(
    worker,
) -> None:
    src: Source = worker.endpoints
    worker.assignment = assignment()
    await worker.sync()
    passes = worker.reconciler.passes
    src.remotes_now = [r("a", "10.0.1.9")]
    await worker.sync()  # a new assignment, but for this node only a remote changed
    assert worker.reconciler.passes == passes and worker.full_skipped == 1
    snap = worker.kernel.snapshot(None)
    assert fdb("10.0.1.9") in snap.fdb and neigh("10.0.1.9") in snap.neigh
    # Outside damage is not seen by a delta-only sync...
    worker.kernel.apply([NeighDel(neigh("10.0.1.9"))])
    await worker.sync()
    assert worker.reconciler.passes == passes
    # ...but resync_s after the last full pass the next sync is one, and repairs it.
    worker._last_full -= worker.config.resync_s
    await worker.sync()
    assert worker.reconciler.passes == passes + 1
    assert neigh("10.0.1.9") in worker.kernel.snapshot(None).neigh
    # Anything but remotes changed (here: the task left): a full pass at once.
    worker.assignment = {**assignment(), "tasks": []}
    await worker.sync()
    assert worker.reconciler.passes == passes + 2
    assert fdb("10.0.1.9") not in worker.kernel.snapshot(None).fdb


def test_an_assignment_that_changed_only_its_index_needs_no_sync(worker) -> None:
    a = {**assignment(), "index": 7, "leader": "m1"}
    content = worker._needs_sync(a)
    assert content is not None
    worker._synced_content, worker._synced_at = content, time.monotonic()  # as _follow does
    assert worker._needs_sync({**a, "index": 8, "leader": "m2"}) is None
    assert worker.metrics()["overlay_syncs_skipped"] == 1
    assert worker._needs_sync({**a, "index": 9, "endpoints": [{"x": 1}]}) is not None
    worker._synced_at -= worker.config.resync_s  # the periodic pass is due: sync anyway
    assert worker._needs_sync({**a, "index": 10}) is not None


class SharedKernel:
    """One FakeKernel used from two threads (the worker's kernel thread and its fast-path
    thread), each call under one lock as the real kernel serialises netlink requests. With
    ``hold`` set, the next base snapshot is taken and then held until ``release``: the full
    pass is stuck with a snapshot that a fast-path delta can make stale meanwhile."""

    def __init__(self) -> None:
        self.fake = FakeKernel()
        self._lock = threading.RLock()
        self.hold = False
        self.held = threading.Event()
        self.release = threading.Event()

    def snapshot(self, netns=None):
        with self._lock:
            state = self.fake.snapshot(netns)
        if netns is None and self.hold:
            self.hold = False
            self.held.set()
            assert self.release.wait(30), "never released"
        return state

    def list_netns(self):
        with self._lock:
            return self.fake.list_netns()

    def apply(self, ops) -> None:
        with self._lock:
            self.fake.apply(ops)


async def test_fast_path_does_not_wait_for_a_full_pass_nor_get_undone_by_it(tmp_path) -> None:
    k = SharedKernel()
    w = Worker(
        node_id="n1",
        ssl_context=ssl.create_default_context(),
        managers=["198.51.100.9:2377"],
        vtep="198.51.100.1",
        data_dir=tmp_path,
        netns_prefix="p-",
        kernel=k,  # type: ignore[arg-type]
        fast_kernel=k,  # type: ignore[arg-type]
        config=WorkerConfig(resync_s=0.0),  # every sync a full pass (no delta-only syncs)
    )
    w.supervisor = FakeSupervisor()  # type: ignore[assignment]
    src = Source()
    w.endpoints = src  # type: ignore[assignment]
    try:
        w.assignment = assignment()
        await w.sync()
        # A full sync starts from the read [.8] and is stuck right after its snapshot...
        src.remotes_now = [r("a", "10.0.1.8")]
        k.hold = True
        full = asyncio.create_task(w.sync())
        await wait_for(k.held.is_set)
        # ...while gossip says .8 is gone and .9 is here: the delta goes in at once.
        src.remotes_now = [r("a", "10.0.1.9")]
        w.request_sync()
        await wait_for(lambda: w.fastpath_applied == 1)
        assert not full.done()
        snap = k.snapshot(None)
        assert fdb("10.0.1.9") in snap.fdb and neigh("10.0.1.9") in snap.neigh
        k.release.set()
        await full
        # The full pass planned again: .8 (its own, older read) is not put back, .9 stays.
        snap = k.snapshot(None)
        assert {e for e in snap.fdb if e.dev == VX_A} == {fdb("10.0.1.9")}
        assert {e for e in snap.neigh if e.dev == VX_A} == {neigh("10.0.1.9")}
        assert w.guard.replans == 1 and w.fastpath_fallbacks == 0
        assert w.guard.model is not None and w.guard.model.remotes == (r("a", "10.0.1.9"),)
        before = len(k.fake.ops_applied)
        await w.sync()
        assert len(k.fake.ops_applied) == before  # converged: the next pass has nothing to do
    finally:
        k.release.set()
        w._kx.shutdown(wait=True)
        w._fx.shutdown(wait=True)


# ---------------------------------------------------------------- the owner's direct push


def _net_db(push_max: int) -> NetworkDB:
    cfg = NetDBConfig.default(owner_push_max=push_max)
    db = NetworkDB("a", random.Random(1), 0.0, cfg)
    db.join_network("n1", 0.0)
    for peer in "bcde":
        db.on_member("join", peer, 0.0)
        db.receive("", _pack(MSG_NET_EVENTS, [peer], [[peer, "n1", 1, False]]), 0.0)
    db.take_outbound()
    return db


def _table_dests(db: NetworkDB) -> list[str]:
    return sorted(d for d, pl in db.take_outbound() if pl[0] == MSG_TABLE_EVENTS)  # type: ignore[misc]


def test_own_change_goes_to_every_member_at_once_even_mid_interval() -> None:
    db = _net_db(push_max=32)
    db.put("n1", "k0", b"v", 1.0)
    db.handle_timer(1.0)
    assert _table_dests(db) == ["b", "c", "d", "e"]  # not just `fanout` (3) of them
    db.put("n1", "k1", b"v", 1.05)  # 50 ms after a round: the gossip tick is not due...
    db.put("n1", "k2", b"v", 1.05)
    assert db.next_deadline() <= 1.05  # type: ignore[operator]
    db.handle_timer(1.05)
    out = [
        (d, msgpack.unpackb(pl[1:])) for d, pl in db.take_outbound() if pl[0] == MSG_TABLE_EVENTS
    ]
    assert sorted(d for d, _ in out) == ["b", "c", "d", "e"]  # ...the push is: one message each
    assert all(sorted(e[0] for e in body[3]) == ["k1", "k2"] for _, body in out)


def test_owner_push_off_is_gossip_only() -> None:
    db = _net_db(push_max=0)
    db.put("n1", "k0", b"v", 1.0)
    db.handle_timer(1.0)
    assert len(_table_dests(db)) == 3  # fanout
    db.put("n1", "k1", b"v", 1.05)
    db.handle_timer(1.05)
    assert _table_dests(db) == []  # waits for the next tick
