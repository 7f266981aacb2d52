"""Encrypted overlays, integrated: Raft state -> the leader's key schedule -> assignments ->
each worker's pass (IpsecHook + overlay reconcile) on a fake kernel and a fake XFRM.

What must hold: SAs for every pair of nodes sharing an encrypted network (and none for
others), joins and leaves add and remove SAs, a node without ESP fails the task with the
EspUnsupported message and builds nothing, and at no point does a VXLAN device of an
encrypted VNI exist without its VNI marked and an out policy towards every VTEP its FDB
points at (cleartext).
"""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest

from swarmnet.ipsec.control import IpsecDriver, ipsec_assignment, ipsec_status, parse_report
from swarmnet.ipsec.keys import KeySet
from swarmnet.ipsec.plan import encrypted_mtu
from swarmnet.ipsec.rotation import INSTALLING, STEADY, SWITCHING, RotationConfig
from swarmnet.ipsec_hook import IpsecHook
from swarmnet.kernel import FakeKernel
from swarmnet.kernel.xfrm import FakeXfrm, XfrmStateAdd
from swarmnet.manager import assignment_for
from swarmnet.overlay.plan import OverlayNetwork, network_mtu, vxlan_name
from swarmnet.raft.state import ClusterState, ipsec_participants
from swarmnet.worker import Worker

NOW = "2024-01-01T00:00:00Z"
NODES = {"n1": "198.51.100.1", "n2": "198.51.100.2", "n3": "198.51.100.3"}


# ---------------------------------------------------------------- a cluster in memory


class Store:
    """What IpsecDriver needs of raft.store.Store: read and submit, on one ClusterState."""

    def __init__(self, state: ClusterState):
        self.state = state
        self.commands: list[dict] = []

    def read(self, fn):
        return fn(self.state)

    async def submit(self, cmd: dict) -> dict:
        self.commands.append(cmd)
        return self.state.apply(cmd)


def cluster(nodes: dict[str, str] = NODES) -> ClusterState:
    s = ClusterState()
    first, *rest = nodes
    ok = s.apply(
        {
            "op": "init",
            "cluster_id": "c1",
            "tokens": {"worker": "w", "manager": "m"},
            "digest": "d",
            "now": NOW,
            "node": {"node_id": first, "hostname": first, "addr": nodes[first], "role": "manager"},
        }
    )
    assert ok == {"ok": True}, ok
    for n in rest:
        s.apply(
            {
                "op": "add_node",
                "node_id": n,
                "hostname": n,
                "addr": nodes[n],
                "role": "worker",
                "now": NOW,
            }
        )
    return s


def network(s: ClusterState, nid: str, encrypted: bool) -> dict:
    opts = {"encrypted": ""} if encrypted else {}
    r = s.apply({"op": "create_network", "id": nid, "name": nid, "options": opts, "now": NOW})
    assert "error" not in r, r
    return s.networks[nid]


def service(s: ClusterState, sid: str, nets: list[str]) -> None:
    spec = {
        "Name": sid,
        "TaskTemplate": {
            "ContainerSpec": {"Image": "sleep", "Args": ["1000"]},
            "Networks": [{"Target": n} for n in nets],
        },
    }
    r = s.apply({"op": "create_service", "id": sid, "spec": spec, "now": NOW})
    assert "error" not in r, r


def task(s: ClusterState, tid: str, sid: str, slot: int, node: str) -> None:
    r = s.apply(
        {
            "op": "create_task",
            "id": tid,
            "service_id": sid,
            "slot": slot,
            "node_id": node,
            "now": NOW,
        }
    )
    assert r.get("id") == tid, r


# ---------------------------------------------------------------- workers on fakes


class FakeSupervisor:
    def __init__(self):
        self.running: dict[str, int] = {}

    def ensure(self, spec) -> None:
        self.running.setdefault(spec.task_id, 1000 + len(self.running))

    async def stop(self, task_id: str, timeout_s: float | None = None) -> None:
        self.running.pop(task_id, None)

    def pid(self, task_id: str) -> int | None:
        return self.running.get(task_id)

    def tasks(self) -> dict[str, int]:
        return dict(self.running)

    async def close(self) -> None:
        pass


class Node:
    def __init__(self, node_id: str, vtep: str, tmp: Path, esp: bool = True):
        self.kernel = FakeKernel()
        self.xfrm = FakeXfrm()
        self.worker = Worker(
            node_id=node_id,
            ssl_context=ssl.create_default_context(),
            managers=["198.51.100.1:2377"],
            vtep=vtep,
            data_dir=tmp / node_id,
            netns_prefix=f"{node_id}-",
            kernel=self.kernel,
        )
        self.worker.supervisor = FakeSupervisor()  # type: ignore[assignment]
        reason = "" if esp else "esp4 module missing (test)"
        self.hook = IpsecHook(
            self.xfrm, epoch_path=tmp / f"{node_id}.epoch", esp_probe=lambda: (esp, reason)
        )
        self.worker.ipsec = self.hook
        self.statuses: dict[str, tuple[str, str]] = {}
        # The invariant is checked after every kernel change, inside the pass too: the
        # ordering (XFRM before the overlay on the way in, after it on the way out) is what
        # is under test, not only where a pass ends.
        apply = self.kernel.apply

        def checked_apply(ops):
            apply(ops)
            check_never_cleartext(self)

        self.kernel.apply = checked_apply  # type: ignore[method-assign]
        xapply = self.xfrm.apply

        def checked_xapply(ops):
            xapply(ops)
            check_never_cleartext(self)

        self.xfrm.apply = checked_xapply  # type: ignore[method-assign]
        self.worker._on_status = lambda tid, st, err, pid: self.statuses.__setitem__(  # type: ignore[method-assign]
            tid, (st, err)
        )

    async def sync(self, state: ClusterState) -> None:
        self.worker.assignment = assignment_for(state, self.worker.node_id)
        await self.worker.sync()
        check_never_cleartext(self)

    def report(self) -> dict:
        """What the hook would POST to /cluster/ipsec."""
        body = {"esp": self.hook.esp[0]} if self.hook.esp else {}
        if self.hook.epoch is not None:
            body["epoch"] = self.hook.epoch
        if self.hook.keys.applied:
            body["applied"] = self.hook.keys.applied
        return body

    def pairs(self) -> set[tuple[str, str]]:
        snap = self.xfrm.snapshot()
        return {(s.src, s.dst) for s in snap.states.values()}

    def vxlans(self) -> dict[int, int]:
        """vni -> MTU of the VXLAN devices in the base namespace."""
        st = self.kernel.snapshot(None)
        return {lk.vxlan.vni: lk.mtu for lk in st.links.values() if lk.vxlan is not None}


def check_never_cleartext(node: Node) -> None:
    """Every VXLAN device of an encrypted VNI that points anywhere: VNI marked, and an out
    policy towards every VTEP of its FDB entries. Called after every pass (and the hook's own ordering keeps it
    true inside a pass: XFRM first on the way in, last on the way out)."""
    a = node.worker.assignment or {}
    enc = {n["vni"] for n in a.get("networks", {}).values() if n.get("encrypted")}
    snap = node.xfrm.snapshot()
    marked = snap.marks.vnis if snap.marks else frozenset()
    out_to = {p.dst for p in snap.policies.values() if p.dir == "out"}
    st = node.kernel.snapshot(None)
    for vni in enc & set(node.vxlans()):
        dsts = {e.dst for e in st.fdb if e.dev == vxlan_name(vni)}
        if not dsts:
            continue  # no FDB entry, no remote: the device sends nothing (learning is off)
        assert vni in marked, f"VXLAN of encrypted VNI {vni} without its mark"
        assert dsts <= out_to, f"FDB towards {dsts - out_to} without an ESP policy"


async def converge(state: ClusterState, store: Store, driver: IpsecDriver, nodes: dict[str, Node]):
    """Leader passes, node passes and reports until nothing changes (bounded)."""
    for _ in range(12):
        before = (state.index, {n: nd.pairs() for n, nd in nodes.items()})
        await driver.step(store)
        for nid, nd in nodes.items():
            await nd.sync(state)
            await driver.report(store, nid, nd.report())
        if (state.index, {n: nd.pairs() for n, nd in nodes.items()}) == before:
            return
    raise AssertionError("did not converge")


def all_pairs(vteps: list[str]) -> set[tuple[str, str]]:
    return {(a, b) for a in vteps for b in vteps if a != b}


@pytest.fixture
def world(tmp_path: Path):
    state = cluster()
    network(state, "sec", encrypted=True)
    network(state, "plain", encrypted=False)
    store = Store(state)
    driver = IpsecDriver(RotationConfig(grace_s=0.0), clock=lambda: 1000.0)
    nodes = {n: Node(n, ip, tmp_path) for n, ip in NODES.items()}
    return state, store, driver, nodes


# ---------------------------------------------------------------- state and manager


def test_encrypted_option_is_stored_and_participants_follow_tasks() -> None:
    s = cluster()
    assert network(s, "sec", True)["encrypted"] is True
    assert network(s, "plain", False)["encrypted"] is False
    service(s, "web", ["sec"])
    service(s, "db", ["plain"])
    task(s, "t1", "web", 1, "n1")
    task(s, "t2", "db", 1, "n2")
    assert ipsec_participants(s) == {"n1": {"sec"}}
    assert ipsec_assignment(s, "n2") is None
    assert assignment_for(s, "n2")["ipsec"] is None
    a = assignment_for(s, "n1")
    assert a["networks"]["sec"]["encrypted"] is True
    assert a["ipsec"] == {"keyset": None, "epochs": {NODES["n1"]: 0}, "networks": ["sec"]}
    # A node that reported "no ESP" takes no part (never gets keys, never stalls rotation).
    s.apply({"op": "ipsec_node", "node_id": "n1", "esp": False})
    assert ipsec_participants(s) == {}


def test_key_set_commands_are_compare_and_set() -> None:
    s = cluster()
    k1 = {"version": 1, "keys": [{"key_id": 1, "key": "00" * 16, "created_at": 0, "tag": "t"}]}
    k1["primary"] = 1
    assert s.apply({"op": "ipsec_keys", "keyset": k1, "phase": STEADY, "since": 0}) == {"ok": True}
    k3 = dict(k1, version=3)
    r = s.apply(
        {"op": "ipsec_keys", "keyset": k3, "phase": STEADY, "since": 0, "expect_version": 2}
    )
    assert r["error"]["status"] == 409
    assert s.apply({"op": "ipsec_keys", "keyset": k1, "phase": STEADY, "since": 0})["noop"]
    assert s.apply({"op": "ipsec_rotate"}) == {"ok": True}
    assert s.ipsec()["force"] is True
    assert s.apply({"op": "ipsec_rotate"})["noop"]


def test_report_parsing_keeps_only_typed_facts() -> None:
    facts, counters = parse_report(
        {"esp": True, "epoch": 2, "applied": "x", "node_id": "evil", "counters": {"1": 5, "a": 1}}
    )
    assert facts == {"esp": True, "epoch": 2}
    assert counters == {1: 5}
    with pytest.raises(ValueError):
        parse_report([1])


def test_encrypted_mtu_in_the_overlay_plan() -> None:
    enc = OverlayNetwork("a", "a", 4097, "10.0.1.0/24", encrypted=True)
    plain = OverlayNetwork("b", "b", 4098, "10.0.2.0/24")
    assert network_mtu(enc, 1500) == encrypted_mtu(1500) == 1416
    assert network_mtu(plain, 1500) == 1450


# ---------------------------------------------------------------- end to end on fakes


async def test_sas_for_every_pair_sharing_the_network_join_and_leave(world) -> None:
    state, store, driver, nodes = world
    service(state, "web", ["sec"])
    service(state, "db", ["plain"])
    task(state, "w1", "web", 1, "n1")
    task(state, "w2", "web", 2, "n2")
    task(state, "d3", "db", 1, "n3")  # n3 is on the unencrypted network only
    await converge(state, store, driver, nodes)

    v1, v2, v3 = NODES["n1"], NODES["n2"], NODES["n3"]
    assert nodes["n1"].pairs() == all_pairs([v1, v2])
    assert nodes["n2"].pairs() == all_pairs([v1, v2])
    assert nodes["n3"].pairs() == set()  # no keys, no SAs: not on an encrypted network
    assert assignment_for(state, "n3")["ipsec"] is None
    vni = state.networks["sec"]["vni"]
    assert nodes["n1"].vxlans() == {vni: 1416}
    assert nodes["n3"].vxlans() == {state.networks["plain"]["vni"]: 1450}
    assert set(nodes["n1"].worker.supervisor.tasks()) == {"w1"}

    # n3 joins the encrypted network: every pair gets its SAs.
    task(state, "w3", "web", 3, "n3")
    await converge(state, store, driver, nodes)
    for n in nodes.values():
        mine = n.worker.vtep
        assert n.pairs() == {p for p in all_pairs([v1, v2, v3]) if mine in p}, n.worker.node_id

    # n2 leaves it: its SAs go everywhere, its VXLAN device too.
    state.apply({"op": "task_desired", "id": "w2", "desired": "shutdown"})
    await converge(state, store, driver, nodes)
    assert nodes["n1"].pairs() == all_pairs([v1, v3])
    assert nodes["n2"].pairs() == set()
    assert vni not in nodes["n2"].vxlans()
    assert nodes["n2"].xfrm.snapshot().marks is None


async def test_forced_rotation_is_make_before_break(world) -> None:
    state, store, driver, nodes = world
    service(state, "web", ["sec"])
    for i, n in enumerate(("n1", "n2", "n3"), 1):
        task(state, f"w{i}", "web", i, n)
    await converge(state, store, driver, nodes)
    assert state.ipsec()["phase"] == STEADY
    first = KeySet.from_dict(state.ipsec()["keyset"])

    state.apply({"op": "ipsec_rotate"})
    phases = []
    for _ in range(10):
        await driver.step(store)
        phases.append(state.ipsec()["phase"])
        ks = KeySet.from_dict(state.ipsec()["keyset"])
        for nid, nd in nodes.items():
            await nd.sync(state)
            # Every SA a node sends with has its inbound twin on the peer (installed first).
            for p in nd.xfrm.snapshot().policies.values():
                if p.dir == "out":
                    peer = next(x for x in nodes.values() if x.worker.vtep == p.dst)
                    assert (p.src, p.dst, p.spi) in peer.xfrm.snapshot().states
            await driver.report(store, nid, nd.report())
        if ks.version > first.version and state.ipsec()["phase"] == STEADY and len(ks.keys) == 1:
            break
    assert INSTALLING in phases and SWITCHING in phases, phases
    final = KeySet.from_dict(state.ipsec()["keyset"])
    assert final.primary != first.primary and len(final.keys) == 1
    assert state.ipsec()["force"] is False
    for nd in nodes.values():
        assert nd.hook.keys.applied == final.version
        assert len(nd.xfrm.snapshot().states) == 2 * 2  # 2 peers x (in + out), one key


async def test_no_esp_fails_the_task_with_the_clear_error_and_builds_nothing(
    tmp_path: Path,
) -> None:
    state = cluster({"n1": NODES["n1"]})
    network(state, "sec", encrypted=True)
    network(state, "plain", encrypted=False)
    service(state, "web", ["sec"])
    service(state, "db", ["plain"])
    task(state, "w1", "web", 1, "n1")
    task(state, "d1", "db", 1, "n1")
    store, driver = Store(state), IpsecDriver(clock=lambda: 1000.0)
    nodes = {"n1": Node("n1", NODES["n1"], tmp_path, esp=False)}
    await converge(state, store, driver, nodes)
    n1 = nodes["n1"]
    st, err = n1.statuses["w1"]
    assert st == "failed"
    assert "network 'sec' is encrypted but this node's kernel cannot do IPsec ESP" in err
    assert "esp4 module missing (test)" in err
    assert set(n1.worker.supervisor.tasks()) == {"d1"}  # the other service runs
    assert state.networks["sec"]["vni"] not in n1.vxlans()
    assert n1.xfrm.applied == []
    assert state.nodes["n1"]["ipsec"]["esp"] is False
    assert ipsec_participants(state) == {}
    # A later pass does not re-report (the state keeps it) and still builds nothing.
    n1.statuses.clear()
    await n1.sync(state)
    assert "w1" not in n1.statuses and state.networks["sec"]["vni"] not in n1.vxlans()


async def test_without_keys_or_published_epoch_the_task_waits(world) -> None:
    state, store, driver, nodes = world
    service(state, "web", ["sec"])
    task(state, "w1", "web", 1, "n1")
    n1 = nodes["n1"]
    await n1.sync(state)  # no leader pass yet: no key set
    assert n1.worker.supervisor.tasks() == {} and n1.vxlans() == {}
    assert n1.hook.epoch == 1  # nothing of ours in the kernel: a new epoch
    await driver.step(store)
    await n1.sync(state)  # a key set, but the managers still publish epoch 0 for n1
    assert n1.worker.supervisor.tasks() == {} and n1.vxlans() == {}
    await driver.report(store, "n1", n1.report())
    await n1.sync(state)
    assert set(n1.worker.supervisor.tasks()) == {"w1"}
    assert n1.xfrm.applied == []  # no peer yet: no SA, nothing could be sent anyway


async def test_restart_with_sas_in_the_kernel_keeps_the_epoch(tmp_path: Path) -> None:
    x = FakeXfrm()
    h = IpsecHook(x, epoch_path=tmp_path / "e", esp_probe=lambda: (True, ""))
    assert h._choose_epoch() == 1
    from swarmnet.kernel.xfrm import XfrmState

    x.apply(
        [XfrmStateAdd(XfrmState("198.51.100.1", "198.51.100.2", 0x1234, h.cfg.reqid, b"k" * 20))]
    )
    h2 = IpsecHook(x, epoch_path=tmp_path / "e", esp_probe=lambda: (True, ""))
    assert h2._choose_epoch() == 1  # SAs survived: same SPIs are still right
    h3 = IpsecHook(FakeXfrm(), epoch_path=tmp_path / "e", esp_probe=lambda: (True, ""))
    assert h3._choose_epoch() == 2  # flushed: new epoch, new SPIs (no replay-window trap)


# ---------------------------------------------------------------- operator settings


def test_ipsec_config_is_validated_and_merged() -> None:
    state = cluster()
    before = state.index
    for bad, field in (
        ({"interval_s": 0}, "interval_s"),
        ({"grace_s": -1}, "grace_s"),
        ({"threshold_packets": 0}, "threshold_packets"),
        ({"threshold_packets": "many"}, "threshold_packets"),
        ({"interval_s": True}, "interval_s"),
    ):
        r = state.apply({"op": "ipsec_config", **bad})
        assert r["error"]["field"] == field, r
    assert state.index == before and "ipsec_config" not in state.cluster
    assert state.apply({"op": "ipsec_config", "threshold_packets": 100}) == {"ok": True}
    assert state.apply({"op": "ipsec_config", "grace_s": 2}) == {"ok": True}
    assert state.cluster["ipsec_config"] == {"threshold_packets": 100, "grace_s": 2.0}
    assert state.apply({"op": "ipsec_config", "grace_s": 2})["noop"] is True
    cfg = IpsecDriver().config(state.cluster["ipsec_config"])
    assert (cfg.threshold_packets, cfg.grace_s, cfg.interval_s) == (100, 2.0, 12 * 3600.0)


async def test_packet_threshold_from_the_store_starts_a_rotation(world) -> None:
    """The leader's driver was built with the default threshold (2^31); the operator's
    setting in the store (``swarm update --ipsec-rotation-packets``) is what counts."""
    state, store, driver, nodes = world
    service(state, "web", ["sec"])
    task(state, "w1", "web", 1, "n1")
    task(state, "w2", "web", 2, "n2")
    await converge(state, store, driver, nodes)
    ks = KeySet.from_dict(state.ipsec()["keyset"])
    await driver.report(store, "n1", {"counters": {str(ks.primary): 500}})
    await driver.step(store)
    assert state.ipsec()["phase"] == STEADY  # 500 < 2^31: nothing to do
    assert state.apply({"op": "ipsec_config", "threshold_packets": 400}) == {"ok": True}
    await driver.step(store)
    assert state.ipsec()["phase"] == INSTALLING
    status = ipsec_status(state)
    assert status["phase"] == INSTALLING and status["config"]["threshold_packets"] == 400
    assert status["nodes"]["n1"]["participant"] and not status["nodes"]["n3"]["participant"]
    # The status is for operators: ids and ages, never key material.
    text = repr(status)
    for k in KeySet.from_dict(state.ipsec()["keyset"]).keys:
        assert k.material.hex() not in text
