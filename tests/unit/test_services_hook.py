"""DNS and the service load balancers read task endpoints from gossip (issue 6).

A worker runs in-process on the fake kernel (as in test_ipsec_integration.py) with the
services hook, an in-memory LB backend per sandbox (lb.fake, the nftables backend minus the
kernel) and a GossipEndpoints whose node is a real NetworkDB without sockets. What must
hold: task records come from the gossip tables plus the node's own tasks (not from the
managers' ``endpoints`` list), and a change of the tables (an owner's delete, a failed
member) reaches DNS and every VIP's backends WITHOUT a worker pass; without gossip, the
managers' list is still used.
"""

from __future__ import annotations

import asyncio
import random
import ssl
import time
from collections.abc import Callable
from pathlib import Path

import msgpack
import pytest
from test_ipsec_integration import FakeSupervisor, cluster, network, service, task

from swarmnet import services_hook as services_hook_module
from swarmnet.dns.records import QTYPE_A, Rcode
from swarmnet.gossip.netdb import MSG_TABLE_EVENTS, NetDBConfig, NetworkDB, _pack
from swarmnet.gossip_endpoints import GossipEndpoints
from swarmnet.kernel import FakeKernel
from swarmnet.lb.fake import FakeBackend
from swarmnet.manager import assignment_for
from swarmnet.overlay.plan import mac_for_ip, sandbox_name
from swarmnet.raft.state import ClusterState
from swarmnet.services_hook import ServicesHook
from swarmnet.worker import Worker

NODES = {"n1": "198.51.100.1", "n2": "198.51.100.2"}
TIMEOUT_S = 10.0


class NodeStub:
    """The part of NetDBNode that GossipEndpoints uses, over a real NetworkDB (no sockets):
    table events go to the endpoint source as the driver would deliver them."""

    def __init__(self, name: str, on_table: Callable) -> None:
        self.db = NetworkDB(name, random.Random(1), 0.0, NetDBConfig())
        self.on_table = on_table
        self.db.on_member("join", "n2", 0.0)

    def _pump(self) -> None:
        self.db.take_outbound()  # nobody to send to
        for ev in self.db.take_events():
            self.on_table(ev)

    def join_network(self, nid: str) -> None:
        self.db.join_network(nid, 0.0)
        self._pump()

    def leave_network(self, nid: str) -> None:
        self.db.leave_network(nid, 0.0)
        self._pump()

    def put(self, nid: str, key: str, value: bytes) -> None:
        self.db.put(nid, key, value, 0.0)
        self._pump()

    def delete(self, nid: str, key: str) -> bool:
        done = self.db.delete(nid, key, 0.0)
        self._pump()
        return done

    def entries(self, nid: str) -> dict[str, tuple[str, bytes]]:
        return self.db.entries(nid)

    def networks(self) -> set[str]:
        return self.db.networks()

    # ---- what the other node (n2) does, as it arrives here --------------------------

    def remote(self, nid: str, key: str, ltime: int, value: dict | None) -> None:
        """n2's entry ``key`` at Lamport time ``ltime`` (None: n2 deleted it)."""
        raw = msgpack.packb(value or {}, use_bin_type=True)
        ent = [key, "n2", ltime, value is None, raw]
        self.db.receive("", _pack(MSG_TABLE_EVENTS, ["n2", nid], [ent]), 0.0)
        self._pump()

    def member(self, kind: str) -> None:
        self.db.on_member(kind, "n2", 0.0)
        self._pump()


def endpoint_value(ip: str, task_name: str, service: str, service_id: str | None) -> dict:
    v = {"ip": ip, "mac": mac_for_ip(ip), "vtep": NODES["n2"], "task": task_name}
    v["service"] = service
    if service_id is not None:  # None: an agent older than issue 6 (no service_id)
        v["service_id"] = service_id
    return v


class World:
    """Cluster state with a vip service ``web`` (t1 on n1, t2 on n2) and a dnsrr service
    ``db`` (t3 on n1, t4 on n2) on network ``front``; n1's worker with the services hook."""

    def __init__(self, tmp: Path, monkeypatch: pytest.MonkeyPatch, gossip: bool) -> None:
        self.state: ClusterState = cluster(NODES)
        network(self.state, "front", encrypted=False)
        service(self.state, "web", ["front"])
        service(self.state, "db", ["front"])
        self.state.services["db"]["spec"]["EndpointSpec"] = {"Mode": "dnsrr"}
        for tid, sid, slot, node in [
            ("t1", "web", 1, "n1"),
            ("t2", "web", 2, "n2"),
            ("t3", "db", 1, "n1"),
            ("t4", "db", 2, "n2"),
        ]:
            task(self.state, tid, sid, slot, node)
        for t in self.state.tasks.values():  # the managers' endpoints list wants them up
            t["status"]["state"] = "running"
        self.lbs: dict[str, FakeBackend] = {}
        self.chosen: list[tuple[str, str | None]] = []

        def choose(prefer: str, netns: str | None) -> FakeBackend:
            self.chosen.append((prefer, netns))
            lb = self.lbs[netns or ""] = FakeBackend()
            return lb

        monkeypatch.setattr(services_hook_module, "choose_backend", choose)
        self.ingress_passes = 0

        def program_ingress(hook: ServicesHook, worker: Worker, assignment: dict) -> None:
            # The real one writes sysctls and runs nft on the host: never in a unit test.
            # What it leaves behind that _render uses: the host's published-ports table.
            self.ingress_passes += 1
            if hook._host_lb is None:
                hook._host_lb = FakeBackend()  # type: ignore[assignment]
            if hook._sbox_nat is None:
                hook._sbox_nat = FakeBackend()  # type: ignore[assignment]

        monkeypatch.setattr(ServicesHook, "_program_ingress", program_ingress)
        self.kernel = FakeKernel()
        self.worker = Worker(
            node_id="n1",
            ssl_context=ssl.create_default_context(),
            managers=["198.51.100.1:2377"],
            vtep=NODES["n1"],
            data_dir=tmp / "n1",
            netns_prefix="n1-",
            kernel=self.kernel,
        )
        self.worker.supervisor = FakeSupervisor()  # type: ignore[assignment]
        self.worker._on_status = lambda *a: None  # type: ignore[method-assign]
        self.hook = ServicesHook(lb_backend="nft", rerender_delay_s=0.001)
        self.attached: dict[str, list[str]] = {}

        async def attach(netns: str, nets: list[str]) -> None:  # no real namespace here
            self.attached[netns] = list(nets)

        self.hook.dns.attach = attach  # type: ignore[method-assign]
        self.worker.hooks.append(self.hook)
        self.node: NodeStub | None = None
        if gossip:
            g = GossipEndpoints("n1", NODES["n1"])
            self.node = NodeStub("n1", g._on_table)
            g.node = self.node  # type: ignore[assignment]
            self.worker.endpoints = g
            self.gossip = g

    def assignment(self, manager_endpoints: bool) -> dict:
        a = assignment_for(self.state, "n1")
        if not manager_endpoints:
            a["endpoints"] = []  # whatever DNS/LB show must then come from elsewhere
        return a

    async def sync(self, manager_endpoints: bool = False) -> None:
        self.worker.assignment = self.assignment(manager_endpoints)
        await self.worker.sync()

    def ip(self, tid: str) -> str:
        return self.state.tasks[tid]["networks"][0]["address"].split("/")[0]

    def vip(self, sid: str = "web") -> str:
        return self.state.services[sid]["endpoint"]["vips"]["front"].split("/")[0]

    def resolve(self, name: str) -> tuple[str, ...]:
        ans = self.hook.dns.records.resolve(name, QTYPE_A, ["front"])
        assert ans.rcode == Rcode.NOERROR, (name, ans)
        return ans.a_records

    def backends(self) -> set[str]:
        """Where a TCP connection from t1's sandbox to web's VIP may land."""
        lb = self.lbs[sandbox_name("n1-", "t1")]
        return {dst.split(":")[0] for dst in lb.trace(self.ip("t1"), self.vip(), "tcp", 80)}

    def forbid_worker_passes(self) -> Callable:
        """From now on a worker pass fails the test; returns the real ``sync`` to restore."""
        passes = self.worker.sync

        async def no_pass() -> None:
            raise AssertionError("a worker pass was needed")

        self.worker.sync = no_pass  # type: ignore[method-assign]
        return passes

    async def wait(self, what: str, check: Callable[[], bool]) -> None:
        loop = asyncio.get_running_loop()
        end = loop.time() + TIMEOUT_S
        while not check():
            assert loop.time() < end, f"timed out waiting for {what}"
            await asyncio.sleep(0.005)

    def publish_t2_t4(self, service_ids: bool = True) -> None:
        """n2's entries arrive (we must be in the network already: a first pass joined it)."""
        assert self.node is not None and "front" in self.node.networks()
        for ltime, (tid, name, svc) in enumerate(
            [("t2", "web.2", "web"), ("t4", "db.2", "db")], start=1
        ):
            sid = svc if service_ids else None
            self.node.remote("front", tid, ltime, endpoint_value(self.ip(tid), name, svc, sid))


@pytest.fixture
async def world(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    w = World(tmp_path, monkeypatch, gossip=True)
    yield w
    await w.worker.close()


async def test_task_records_and_vip_backends_come_from_gossip_and_own_tasks(world) -> None:
    await world.sync()  # the managers' endpoints list is empty in these assignments
    assert world.resolve("tasks.web") == (world.ip("t1"),)  # our own task, from the assignment
    world.publish_t2_t4()
    await world.sync()
    assert set(world.resolve("tasks.web")) == {world.ip("t1"), world.ip("t2")}
    assert world.resolve("web") == (world.vip(),)
    assert set(world.resolve("db")) == {world.ip("t3"), world.ip("t4")}  # dnsrr
    assert world.resolve("web.2") == (world.ip("t2"),)  # the task name, from the entry
    assert world.backends() == {world.ip("t1"), world.ip("t2")}
    # The sandbox's LB came from choose_backend(--lb-backend, its namespace).
    assert ("nft", sandbox_name("n1-", "t1")) in world.chosen
    assert world.attached[sandbox_name("n1-", "t1")] == ["front"]


async def test_gossip_changes_reach_dns_and_lb_without_a_worker_pass(world) -> None:
    await world.sync()
    world.publish_t2_t4()
    await world.sync()
    assert world.backends() == {world.ip("t1"), world.ip("t2")}
    passes = world.forbid_worker_passes()
    # n2 removes t2 (its task exited or was removed): gone from DNS and the VIP.
    world.node.remote("front", "t2", 10, None)
    await world.wait("t2 to leave DNS", lambda: world.resolve("tasks.web") == (world.ip("t1"),))
    await world.wait("t2 to leave the VIP", lambda: world.backends() == {world.ip("t1")})
    gone = world.hook.dns.records.resolve("web.2", QTYPE_A, ["front"])
    assert gone.rcode == Rcode.FORWARD  # no longer a name of ours
    # n2 dies (failure detection): its remaining entry (t4) leaves the dnsrr answer.
    world.node.member("failed")
    await world.wait("t4 to leave DNS", lambda: world.resolve("db") == (world.ip("t3"),))
    # n2 comes back within the grace period: t4 is back, still without a worker pass.
    world.node.member("join")
    await world.wait(
        "t4 to come back", lambda: set(world.resolve("db")) == {world.ip("t3"), world.ip("t4")}
    )
    assert world.hook.rerenders >= 3
    world.worker.sync = passes  # type: ignore[method-assign]


async def test_a_burst_of_gossip_changes_costs_few_renders(world) -> None:
    await world.sync()
    world.hook.rerender_delay_s = 0.05
    before = world.hook.rerenders
    for i in range(20):
        ip = f"10.0.0.{200 + i}"
        world.node.remote("front", f"x{i}", i + 1, endpoint_value(ip, f"web.{i + 3}", "web", "web"))
    await world.wait("the burst to be rendered", lambda: len(world.resolve("tasks.web")) == 21)
    assert world.hook.rerenders - before <= 2  # coalesced: not one render per event


async def test_entries_of_older_agents_without_service_id_still_count(world) -> None:
    await world.sync()
    world.publish_t2_t4(service_ids=False)
    await world.sync()
    assert world.backends() == {world.ip("t1"), world.ip("t2")}
    assert set(world.resolve("tasks.db")) == {world.ip("t3"), world.ip("t4")}


async def test_managers_list_is_not_read_for_a_network_whose_table_we_hold(world) -> None:
    # The managers still list t2 (stale: they have not heard yet), gossip says it is gone.
    await world.sync()
    world.publish_t2_t4()
    world.node.remote("front", "t2", 10, None)
    await world.sync(manager_endpoints=True)
    assert world.resolve("tasks.web") == (world.ip("t1"),)
    assert world.backends() == {world.ip("t1")}


async def test_without_gossip_the_managers_list_is_used(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    w = World(tmp_path, monkeypatch, gossip=False)
    try:
        await w.sync(manager_endpoints=True)
        assert set(w.resolve("tasks.web")) == {w.ip("t1"), w.ip("t2")}
        assert w.backends() == {w.ip("t1"), w.ip("t2")}
    finally:
        await w.worker.close()


async def test_removed_sandbox_is_never_touched_by_a_later_render(world) -> None:
    await world.sync()
    world.publish_t2_t4()
    await world.sync()
    t1 = sandbox_name("n1-", "t1")
    world.state.tasks["t1"]["desired_state"] = "shutdown"
    await world.sync()
    assert t1 not in world.hook._lbs
    before = world.lbs[t1].dump()
    world.node.remote("front", "t2", 10, None)
    await world.wait("a render", lambda: world.resolve("tasks.web") == ())
    assert world.lbs[t1].dump() == before  # the old sandbox's table was left alone


def test_lb_backend_is_validated() -> None:
    with pytest.raises(ValueError, match="auto, ipvs or nft"):
        ServicesHook(lb_backend="lvs")  # type: ignore[arg-type]


def test_gossip_endpoints_listener_entries_and_no_manager_fallback() -> None:
    g = GossipEndpoints("n1", NODES["n1"])
    seen: list = []
    g.add_listener(seen.append)
    g.add_listener(seen.append)  # once only
    a = {"networks": {"front": {}}, "tasks": [], "endpoints": [{"bogus": 1}]}
    assert g.remotes(a) == []  # no gossip node: nothing, and never the managers' list
    node = NodeStub("n1", g._on_table)
    g.node = node  # type: ignore[assignment]
    node.join_network("front")
    node.put("front", "own", b"\x80")  # our own entry: no listener call
    assert seen == []
    node.remote("front", "t9", 1, endpoint_value("10.0.0.9", "web.9", "web", None))
    assert [(e.kind, e.key) for e in seen] == [("add", "t9")]
    assert g.task_endpoints(a) == [
        {
            "network_id": "front",
            "task_id": "t9",
            "address": "10.0.0.9",
            "vtep": NODES["n2"],
            "node_id": "n2",
            "task_name": "web.9",
            "service_name": "web",
            "service_id": "",
        }
    ]
    g.remove_listener(seen.append)
    node.remote("front", "t9", 2, None)
    assert len(seen) == 1


async def test_routing_mesh_backends_come_from_the_ingress_table(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every node holds the ingress table (it joins it with or without a local task), so
    the published port's backends follow gossip too: n2's task leaves the mesh of n1 as
    soon as n2 deletes its entry."""
    w = World(tmp_path, monkeypatch, gossip=True)
    try:
        port = {"Protocol": "tcp", "TargetPort": 80, "PublishedPort": 8080}
        spec = {
            "Name": "pub",
            "TaskTemplate": {"ContainerSpec": {"Image": "x"}, "Networks": []},
            "EndpointSpec": {"Ports": [port]},
        }
        r = w.state.apply({"op": "create_service", "id": "pub", "spec": spec, "now": "t"})
        assert "error" not in r, r
        task(w.state, "p1", "pub", 1, "n2")  # on n2 only: n1 has no task on ingress
        w.state.tasks["p1"]["status"]["state"] = "running"
        iid = w.state.ingress_network()["id"]
        ingress_ip = w.state.tasks["p1"]["networks"][0]["address"].split("/")[0]
        await w.sync()
        assert iid in w.gossip.joined_networks()
        assert w.node is not None
        w.node.remote(iid, "p1", 1, endpoint_value(ingress_ip, "pub.1", "pub", "pub"))

        def mesh() -> set[str]:
            host = w.hook._host_lb
            assert host is not None
            svc = {s.port: s for s in host.dump().services}.get(8080)
            return {b.ip for b in svc.backends} if svc is not None else set()

        await w.wait("p1 in the mesh", lambda: mesh() == {ingress_ip})
        w.node.remote(iid, "p1", 2, None)
        await w.wait("p1 out of the mesh", lambda: mesh() == set())
        assert w.ingress_passes >= 1
    finally:
        await w.worker.close()


def test_a_local_task_that_stops_running_is_withdrawn_and_comes_back() -> None:
    """The supervisor's status reaches the tables directly (worker -> task_state): an exited
    task leaves every node's DNS, LB and FDB within one propagation round, no manager."""
    g = GossipEndpoints("n1", NODES["n1"])
    node = NodeStub("n1", g._on_table)
    g.node = node  # type: ignore[assignment]
    t1 = {
        "id": "t1",
        "name": "web.1",
        "service_name": "web",
        "service_id": "web",
        "desired_state": "running",
        "spec": {"x": 1},
        "networks": [{"network_id": "front", "address": "10.0.0.5/24"}],
    }
    a = {"networks": {"front": {}}, "tasks": [t1]}
    g.remotes(a)
    assert set(node.entries("front")) == {"t1"}
    g.task_state("t1", "failed")  # exited; the supervisor restarts it after a backoff
    assert node.entries("front") == {}
    assert node.networks() == {"front"}  # still in the network: our view of it stays
    g.remotes(a)  # a worker pass in between does not publish it again
    assert node.entries("front") == {}
    g.task_state("t1", "starting")
    assert node.entries("front") == {}
    g.task_state("t1", "running")
    assert set(node.entries("front")) == {"t1"}
    g.task_state("t9", "failed")  # not ours (any more): nothing changes
    assert set(node.entries("front")) == {"t1"}


async def test_our_own_exited_task_leaves_our_dns_and_lb_without_a_worker_pass(world) -> None:
    await world.sync()
    world.publish_t2_t4()
    await world.sync()
    assert world.backends() == {world.ip("t1"), world.ip("t2")}
    passes = world.forbid_worker_passes()
    world.gossip.task_state("t3", "failed")  # db.1, dnsrr, on this node
    await world.wait("t3 to leave DNS", lambda: world.resolve("db") == (world.ip("t4"),))
    world.gossip.task_state("t3", "running")
    await world.wait(
        "t3 to come back", lambda: set(world.resolve("db")) == {world.ip("t3"), world.ip("t4")}
    )
    world.worker.sync = passes  # type: ignore[method-assign]


async def test_a_pass_that_changes_nothing_renders_nothing(
    world, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 5: the hook ran its whole render on every worker pass (tens of ms, up to a
    second, with the agent's loop unable to read gossip meanwhile). A pass whose inputs did
    not change must not rebuild the DNS table nor send any LB sync to the kernel thread;
    a changed input renders exactly what it changes."""
    await world.sync()
    world.publish_t2_t4()
    await world.sync()
    builds: list[int] = []
    real_records = services_hook_module.records_from_assignment

    def records(*a):  # noqa: ANN002, ANN202
        builds.append(1)
        return real_records(*a)

    monkeypatch.setattr(services_hook_module, "records_from_assignment", records)
    synced: list[str] = []
    real_sync = world.hook._sync_sandbox

    def sync_sandbox(netns, state, create):  # noqa: ANN001, ANN202
        synced.append(netns)
        return real_sync(netns, state, create)

    world.hook._sync_sandbox = sync_sandbox  # type: ignore[method-assign]
    await world.sync()
    await world.sync()
    assert builds == [] and synced == []
    # A change: t2 leaves (n2 deleted it). One DNS build, and the VIP tables of the two
    # sandboxes on "front" (web's VIP is there) are synced, once each.
    world.hook.rerender_delay_s = 3600.0  # only the pass below may render it
    world.node.remote("front", "t2", 10, None)
    await world.sync()
    assert len(builds) == 1
    assert sorted(synced) == [sandbox_name("n1-", "t1"), sandbox_name("n1-", "t3")]
    assert world.backends() == {world.ip("t1")}
    assert world.resolve("tasks.web") == (world.ip("t1"),)


async def test_ingress_plumbing_is_checked_on_change_and_after_full_passes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The routing mesh's plumbing (a host snapshot, sysctls, nftables) is not redone on
    every pass: only when its inputs changed, after a full kernel pass of the worker (it
    may have recreated the ingress sandbox) and every INGRESS_RECHECK_S."""
    w = World(tmp_path, monkeypatch, gossip=True)
    try:
        await w.sync()
        assert w.ingress_passes == 1
        w.worker._last_full = time.monotonic() + 3600.0
        full_before = w.worker.reconciler.passes
        await w.sync()
        assert w.worker.reconciler.passes == full_before  # no full pass...
        assert w.ingress_passes == 1  # ...and no ingress check
        w.worker._last_full = float("-inf")  # the next pass is a full one
        await w.sync()
        assert w.worker.reconciler.passes == full_before + 1
        assert w.ingress_passes == 2
        monkeypatch.setattr(services_hook_module, "INGRESS_RECHECK_S", 0.0)
        w.worker._last_full = time.monotonic() + 3600.0
        await w.sync()
        assert w.ingress_passes == 3  # the periodic re-check
    finally:
        await w.worker.close()


def test_a_new_task_stays_published_while_it_starts() -> None:
    """Issue 5: the supervisor reports "starting" before "running"; a new task published
    with its assignment must not be withdrawn in between (it flapped on every node)."""
    g = GossipEndpoints("n1", NODES["n1"])
    node = NodeStub("n1", g._on_table)
    g.node = node  # type: ignore[assignment]
    seen: list = []
    g.add_listener(seen.append)
    t1 = {
        "id": "t1",
        "name": "web.1",
        "service_name": "web",
        "service_id": "web",
        "desired_state": "running",
        "spec": {"x": 1},
        "networks": [{"network_id": "front", "address": "10.0.0.5/24"}],
    }
    g.remotes({"networks": {"front": {}}, "tasks": [t1]})
    assert set(node.entries("front")) == {"t1"}
    g.task_state("t1", "starting")
    assert set(node.entries("front")) == {"t1"}
    g.task_state("t1", "running")
    assert set(node.entries("front")) == {"t1"}
    assert seen == []  # nothing changed for the consumers either


def test_programmed_logs_the_time_the_worker_gives(caplog: pytest.LogCaptureFixture) -> None:
    g = GossipEndpoints("n1", NODES["n1"])
    node = NodeStub("n1", g._on_table)
    g.node = node  # type: ignore[assignment]
    node.join_network("front")
    node.remote("front", "t9", 1, endpoint_value("10.0.0.9", "web.9", "web", "web"))
    caplog.set_level("INFO", logger="swarmnet.gossip_endpoints")
    g.programmed(g._events, at=1234.5)
    assert "programmed endpoint front/t9" in caplog.text
    assert "done=1234.500000" in caplog.text
