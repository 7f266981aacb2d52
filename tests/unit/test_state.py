"""Tests of the replicated state machine (swarmnet/raft/state.py).

Table tests pin every command's result (and that a refused command changes nothing); the
determinism tests check the property Raft relies on (same log -> same state, also across a
pickle round trip, which is what pysyncobj's full dump does); a hypothesis state machine
drives random workloads through ``apply`` and the scheduler and checks the IPAM and slot
invariants after every step.
"""

from __future__ import annotations

import copy
import ipaddress
import pickle
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from swarmnet.orchestrator import scheduler
from swarmnet.raft.ipam import VXLAN_ID_FIELD, IPAMError
from swarmnet.raft.state import ClusterState, check_name

NOW = "2025-01-01T00:00:00.000000Z"

# --------------------------------------------------------------------------- helpers


def init_cmd(cluster_id: str = "c1", node_id: str = "n1", **kw: Any) -> dict:
    return {
        "op": "init",
        "cluster_id": cluster_id,
        "tokens": {"worker": "wsecret", "manager": "msecret"},
        "digest": "digest",
        "pools": kw.get("pools"),
        "subnet_size": kw.get("subnet_size"),
        # These tests predate the ingress network (issue 6): without it the first user
        # network gets the first block. tests/unit/test_state_services.py covers ingress.
        "ingress": kw.get("ingress", False),
        "now": NOW,
        "node": {
            "node_id": node_id,
            "hostname": "h1",
            "addr": "198.51.100.1",
            "role": "manager",
            "secret_hash": "x",
        },
    }


def add_node(node_id: str, hostname: str | None = None) -> dict:
    return {
        "op": "add_node",
        "node_id": node_id,
        "hostname": hostname or node_id,
        "addr": "198.51.100.9",
        "role": "worker",
        "secret_hash": "y",
        "now": NOW,
    }


def net_cmd(nid: str, name: str, **kw: Any) -> dict:
    return {"op": "create_network", "id": nid, "name": name, "now": NOW, **kw}


def spec(name: str, replicas: int = 1, networks: tuple[str, ...] = ()) -> dict:
    return {
        "Name": name,
        "TaskTemplate": {
            "ContainerSpec": {"Image": "sleep", "Args": ["1000"]},
            "Networks": [{"Target": n, "Aliases": []} for n in networks],
        },
        "Mode": {"Replicated": {"Replicas": replicas}},
    }


def svc_cmd(sid: str, name: str, replicas: int = 1, networks: tuple[str, ...] = ()) -> dict:
    return {"op": "create_service", "id": sid, "spec": spec(name, replicas, networks), "now": NOW}


def task_cmd(tid: str, sid: str, slot: int, node: str = "n1") -> dict:
    return {
        "op": "create_task",
        "id": tid,
        "service_id": sid,
        "slot": slot,
        "node_id": node,
        "now": NOW,
    }


def ok(state: ClusterState, cmd: dict) -> dict:
    result = state.apply(cmd)
    assert "error" not in result, result
    return result


def refused(state: ClusterState, cmd: dict, status: int, field: str) -> dict:
    """Apply a command that must be refused, and check it changed nothing."""
    before = canonical(state)
    result = state.apply(cmd)
    assert "error" in result, result
    assert (result["error"]["status"], result["error"]["field"]) == (status, field), result
    assert result["error"]["message"]
    assert canonical(state) == before, "a refused command changed the state"
    return result["error"]


def canonical(x: Any) -> Any:
    """An order-preserving plain dump: equal iff the states are equal AND iterate alike
    (iteration order drives the scheduler, so it is part of the replicated state)."""
    if isinstance(x, ClusterState):
        return canonical({k: v for k, v in vars(x).items() if k != "ipam"}) + [
            ("ipam", None if x.ipam is None else canonical(x.ipam.to_dict()))
        ]
    if isinstance(x, dict):
        return [(k, canonical(v)) for k, v in x.items()]
    if isinstance(x, list | tuple):
        return [canonical(v) for v in x]
    return x


@pytest.fixture
def s() -> ClusterState:
    state = ClusterState()
    ok(state, init_cmd())
    return state


# --------------------------------------------------------------------------- cluster, nodes


def test_commands_before_init_are_refused() -> None:
    state = ClusterState()
    refused(state, net_cmd("N1", "net"), 503, "swarm")
    refused(state, svc_cmd("S1", "web"), 503, "swarm")
    refused(state, add_node("n2"), 503, "swarm")


def test_unknown_op_is_a_result_not_an_exception(s: ClusterState) -> None:
    refused(s, {"op": "frobnicate"}, 400, "op")
    refused(s, {}, 400, "op")


def test_init_idempotent_and_second_cluster_refused(s: ClusterState) -> None:
    before = canonical(s)
    assert s.apply(init_cmd()) == {"ok": True, "noop": True}
    assert canonical(s) == before
    refused(s, init_cmd(cluster_id="other"), 503, "swarm")
    assert s.cluster is not None and s.cluster["id"] == "c1"
    assert list(s.nodes) == ["n1"] and s.nodes["n1"]["state"] == "ready"
    assert s.cluster["pools"] == ["10.0.0.0/8"] and s.cluster["subnet_size"] == 24


def test_init_with_bad_pool_is_refused_and_leaves_no_cluster() -> None:
    state = ClusterState()
    refused(state, init_cmd(pools=["8.8.0.0/16"]), 400, "DefaultAddrPool")
    assert state.cluster is None and state.ipam is None
    ok(state, init_cmd(pools=["172.16.0.0/12"], subnet_size=26))
    ok(state, net_cmd("N1", "net"))
    assert state.networks["N1"]["subnet"] == "172.16.0.0/26"


def test_add_node_idempotent(s: ClusterState) -> None:
    ok(s, add_node("n2"))
    before = canonical(s)
    assert s.apply(add_node("n2", hostname="renamed")) == {"ok": True, "noop": True}
    assert canonical(s) == before
    assert s.nodes["n2"]["hostname"] == "n2"


def test_rotate_token_bumps_cluster_version(s: ClusterState) -> None:
    assert s.cluster is not None
    v = s.cluster["version"]
    ok(s, {"op": "rotate_token", "role": "worker", "secret": "new", "now": NOW})
    assert s.cluster["tokens"]["worker"] == "new" and s.cluster["version"] > v


# --------------------------------------------------------------------------- networks


@pytest.mark.parametrize(
    "name",
    [None, "", 5, ["a"], "-lead", ".lead", "has space", "x" * 64, "a/b", "abc\n", "é"],
)
def test_create_network_name_validation(s: ClusterState, name: Any) -> None:
    refused(s, net_cmd("N1", name), 400, "Name")


def test_check_name_accepts_valid_names() -> None:
    for name in ("a", "A1", "web_1.x-y", "x" * 63):
        assert check_name(name) == name


def test_create_network_auto_subnet_and_vni(s: ClusterState) -> None:
    ok(s, net_cmd("N1", "one"))
    ok(s, net_cmd("N2", "two"))
    n1, n2 = s.networks["N1"], s.networks["N2"]
    assert (n1["subnet"], n1["gateway"], n1["vni"]) == ("10.0.0.0/24", "10.0.0.1", 4096)
    assert (n2["subnet"], n2["vni"]) == ("10.0.1.0/24", 4097)
    assert n1["driver"] == "overlay" and n1["attachable"] is False
    assert s.ipam is not None and s.ipam.subnet_of("N1") == "10.0.0.0/24"


def test_create_network_duplicate_name_409_and_same_id_retry_noop(s: ClusterState) -> None:
    ok(s, net_cmd("N1", "net"))
    # A retried command (same id) after an unknown outcome must succeed as a no-op...
    before = canonical(s)
    assert s.apply(net_cmd("N1", "net")) == {"ok": True, "noop": True, "id": "N1"}
    assert canonical(s) == before
    # ...while another create with the same name is a conflict.
    refused(s, net_cmd("N2", "net"), 409, "Name")


@pytest.mark.parametrize(
    ("subnet", "status"),
    [
        ("10.0.0.1/24", 400),  # host bits
        ("8.8.8.0/24", 400),  # public space
        ("10.0.0.0/30", 400),  # too small
        ("10.0.0.0", 400),  # no prefix
        ("banana", 400),
        ("fd00::/64", 400),
        (5, 400),
    ],
)
def test_create_network_requested_subnet_errors_name_the_field(
    s: ClusterState, subnet: Any, status: int
) -> None:
    refused(s, net_cmd("N1", "net", subnet=subnet), status, "Subnet")


def test_create_network_requested_subnet_overlap_409(s: ClusterState) -> None:
    ok(s, net_cmd("N1", "a", subnet="10.5.0.0/16"))
    refused(s, net_cmd("N2", "b", subnet="10.5.3.0/24"), 409, "Subnet")
    ok(s, net_cmd("N3", "c", subnet="192.168.7.0/24"))
    assert s.networks["N3"]["subnet"] == "192.168.7.0/24"


def test_create_network_driver_refused(s: ClusterState) -> None:
    refused(s, net_cmd("N1", "net", driver="bridge"), 400, "Driver")


def without_subnet_cursor(state: ClusterState) -> Any:
    dump = canonical(state)
    ipam = dict(dump[-1][1])
    del ipam["subnet_cursor"]
    return dump[:-1], ipam


def test_create_network_nothing_half_created_when_vni_fails(s: ClusterState) -> None:
    ok(s, net_cmd("N1", "a", vni=5000))
    for cmd, status in ((net_cmd("N2", "b", vni=5000), 409), (net_cmd("N3", "c", vni=0), 400)):
        before = without_subnet_cursor(s)
        err = s.apply(cmd)["error"]
        assert (err["status"], err["field"]) == (status, VXLAN_ID_FIELD)
        # The subnet taken before the VNI failed is given back. (The automatic subnet cursor
        # may have moved on: harmless, and the same on every replica.)
        assert without_subnet_cursor(s) == before
    assert s.ipam is not None
    assert s.ipam.subnet_of("N2") is None and s.ipam.subnet_of("N3") is None
    s.ipam.check_invariants()
    ok(s, net_cmd("N4", "d", subnet="10.0.1.0/24"))  # free again


def test_remove_network(s: ClusterState) -> None:
    ok(s, net_cmd("N1", "net"))
    ok(s, svc_cmd("S1", "web", 1, ("N1",)))
    refused(s, {"op": "remove_network", "id": "N1"}, 409, "id")
    ok(s, task_cmd("T1", "S1", 1))
    # A running task holds the network even without the service check.
    s.services["S1"]["spec"]["TaskTemplate"]["Networks"] = []
    err = refused(s, {"op": "remove_network", "id": "N1"}, 409, "id")
    assert "task" in err["message"]
    s.services["S1"]["spec"]["TaskTemplate"]["Networks"] = [{"Target": "N1"}]
    ok(s, {"op": "remove_service", "id": "S1", "now": NOW})
    # The service is gone and its task is shutting down: the network can go right away, and
    # the task is detached from it (its address goes with the subnet).
    ok(s, {"op": "remove_network", "id": "N1"})
    assert s.tasks["T1"]["networks"] == []
    ok(s, {"op": "remove_task", "id": "T1"})
    assert s.networks == {} and s.ipam is not None and s.ipam.subnet_of("N1") is None
    assert s.ipam.vni_of("N1") is None
    refused(s, {"op": "remove_network", "id": "N1"}, 404, "id")


# --------------------------------------------------------------------------- services


def test_create_service_validation_duplicates_and_unknown_network(s: ClusterState) -> None:
    ok(s, net_cmd("N1", "net"))
    refused(s, svc_cmd("S0", "bad name"), 400, "Name")
    refused(s, svc_cmd("S0", "web", 1, ("N1", "NOPE")), 404, "TaskTemplate.Networks[1].Target")
    ok(s, svc_cmd("S1", "web", 2, ("N1",)))
    before = canonical(s)
    assert s.apply(svc_cmd("S1", "web", 2, ("N1",)))["noop"] is True  # retried create
    assert canonical(s) == before
    refused(s, svc_cmd("S2", "web"), 409, "Name")


def test_create_service_deep_copies_its_spec(s: ClusterState) -> None:
    cmd = svc_cmd("S1", "web", 1)
    ok(s, cmd)
    cmd["spec"]["Mode"]["Replicated"]["Replicas"] = 99
    assert s.services["S1"]["spec"]["Mode"]["Replicated"]["Replicas"] == 1


def test_update_service_version_check_and_rename(s: ClusterState) -> None:
    ok(s, net_cmd("N1", "net"))
    ok(s, svc_cmd("S1", "web", 1, ("N1",)))
    v = s.services["S1"]["version"]
    upd = {
        "op": "update_service",
        "id": "S1",
        "version": v,
        "spec": spec("web", 3, ("N1",)),
        "now": NOW,
    }
    ok(s, upd)
    assert s.services["S1"]["version"] > v
    assert s.services["S1"]["spec"]["Mode"]["Replicated"]["Replicas"] == 3
    refused(s, upd, 409, "version")  # the same update again is stale now
    v = s.services["S1"]["version"]
    refused(
        s,
        {
            "op": "update_service",
            "id": "S1",
            "version": v,
            "spec": spec("web2", 3, ("N1",)),
            "now": NOW,
        },
        400,
        "Name",
    )
    refused(
        s,
        {"op": "update_service", "id": "S1", "version": v, "spec": spec("web", 3), "now": NOW},
        400,
        "TaskTemplate.Networks",
    )
    refused(
        s,
        {"op": "update_service", "id": "NOPE", "version": v, "spec": spec("web"), "now": NOW},
        404,
        "id",
    )


def test_remove_service_marks_tasks_remove(s: ClusterState) -> None:
    ok(s, svc_cmd("S1", "web", 2))
    ok(s, task_cmd("T1", "S1", 1))
    ok(s, task_cmd("T2", "S1", 2))
    ok(s, {"op": "remove_service", "id": "S1", "now": NOW})
    assert "S1" not in s.services
    assert {t["desired_state"] for t in s.tasks.values()} == {"remove"}
    refused(s, {"op": "remove_service", "id": "S1", "now": NOW}, 404, "id")
    # A removed task is never resurrected.
    assert s.apply({"op": "task_desired", "id": "T1", "desired": "running"})["noop"] is True
    assert s.tasks["T1"]["desired_state"] == "remove"


# --------------------------------------------------------------------------- tasks


def test_create_task_slot_compare_and_set(s: ClusterState) -> None:
    ok(s, svc_cmd("S1", "web", 1))
    assert "noop" not in ok(s, task_cmd("T1", "S1", 1))
    before = canonical(s)
    # A second scheduler (or a deposed leader) filling the same slot: no-op.
    assert s.apply(task_cmd("T2", "S1", 1))["noop"] is True
    assert s.apply(task_cmd("T1", "S1", 1))["noop"] is True  # a retried command
    assert canonical(s) == before
    # Once the slot's task is shut down, the slot can be filled again.
    ok(s, {"op": "task_desired", "id": "T1", "desired": "shutdown"})
    assert "noop" not in ok(s, task_cmd("T3", "S1", 1))


def test_create_task_allocates_one_ip_per_network(s: ClusterState) -> None:
    ok(s, net_cmd("N1", "a"))
    ok(s, net_cmd("N2", "b"))
    ok(s, svc_cmd("S1", "web", 1, ("N1", "N2")))
    ok(s, task_cmd("T1", "S1", 1))
    ok(s, task_cmd("T2", "S1", 2))
    t1 = s.tasks["T1"]
    # .2 of each network is the service's VIP (allocated at create_service).
    assert t1["networks"] == [
        {"network_id": "N1", "address": "10.0.0.3/24"},
        {"network_id": "N2", "address": "10.0.1.3/24"},
    ]
    assert s.tasks["T2"]["networks"][0]["address"] == "10.0.0.4/24"
    assert t1["status"]["state"] == "assigned" and t1["desired_state"] == "running"
    assert s.ipam is not None and s.ipam.used_ips("N1") == {
        "vip:S1": "10.0.0.2/24",
        "T1": "10.0.0.3/24",
        "T2": "10.0.0.4/24",
    }


def test_create_task_ip_exhaustion_releases_partial_allocation(s: ClusterState) -> None:
    ok(s, net_cmd("N1", "big"))
    ok(s, net_cmd("N2", "tiny", subnet="10.9.0.0/29"))  # 5 addresses: the VIP and 4 tasks
    ok(s, svc_cmd("S1", "web", 10, ("N1", "N2")))
    for i in range(1, 5):
        ok(s, task_cmd(f"T{i}", "S1", i))
    assert s.ipam is not None
    before = (canonical(s.tasks), s.index, s.ipam.used_ips("N1"), s.ipam.used_ips("N2"))
    err = s.apply(task_cmd("T5", "S1", 5))["error"]
    assert (err["status"], err["field"]) == (409, "Networks")
    # The N1 address taken before N2 ran out was given back (N1's serial cursor moved on).
    assert (canonical(s.tasks), s.index, s.ipam.used_ips("N1"), s.ipam.used_ips("N2")) == before
    s.ipam.check_invariants()


def test_create_task_refuses_down_or_unknown_nodes_and_removed_services(s: ClusterState) -> None:
    ok(s, add_node("n2"))
    ok(s, svc_cmd("S1", "web", 3))
    ok(s, {"op": "node_state", "node_id": "n2", "state": "down", "now": NOW})
    before = canonical(s)
    assert s.apply(task_cmd("T1", "S1", 1, node="n2"))["noop"] is True
    assert s.apply(task_cmd("T1", "S1", 1, node="ghost"))["noop"] is True
    assert s.apply(task_cmd("T1", "NOPE", 1))["noop"] is True
    assert canonical(s) == before


def test_task_status_only_from_owning_node(s: ClusterState) -> None:
    ok(s, add_node("n2"))
    ok(s, svc_cmd("S1", "web", 1))
    ok(s, task_cmd("T1", "S1", 1, node="n1"))
    r = ok(
        s,
        {
            "op": "task_status",
            "node_id": "n2",
            "statuses": [{"id": "T1", "state": "running"}],
            "now": NOW,
        },
    )
    assert r["changed"] == 0 and s.tasks["T1"]["status"]["state"] == "assigned"
    r = ok(
        s,
        {
            "op": "task_status",
            "node_id": "n1",
            "statuses": [
                {"id": "T1", "state": "running", "pid": 42},
                {"id": "NOPE", "state": "running"},
            ],
            "now": NOW,
        },
    )
    assert r["changed"] == 1 and s.tasks["T1"]["status"]["state"] == "running"
    assert s.tasks["T1"]["pid"] == 42
    v = s.index
    r = ok(
        s,
        {
            "op": "task_status",
            "node_id": "n1",
            "statuses": [{"id": "T1", "state": "running"}],
            "now": NOW,
        },
    )
    assert r["changed"] == 0 and s.index == v  # a repeated report changes nothing


def test_remove_task_releases_ips_and_is_idempotent(s: ClusterState) -> None:
    ok(s, net_cmd("N1", "net"))
    ok(s, svc_cmd("S1", "web", 1, ("N1",)))
    ok(s, task_cmd("T1", "S1", 1))
    ok(s, {"op": "remove_task", "id": "T1"})
    assert s.tasks == {} and s.ipam is not None
    assert s.ipam.used_ips("N1") == {"vip:S1": "10.0.0.2/24"}  # the VIP lives with the service
    assert s.apply({"op": "remove_task", "id": "T1"})["noop"] is True


def test_node_down_orphans_its_tasks(s: ClusterState) -> None:
    ok(s, add_node("n2"))
    ok(s, svc_cmd("S1", "web", 3))
    ok(s, task_cmd("T1", "S1", 1, node="n1"))
    ok(s, task_cmd("T2", "S1", 2, node="n2"))
    ok(s, task_cmd("T3", "S1", 3, node="n2"))
    # T3's process has just exited (the worker will restart it): it still holds slot 3.
    ok(
        s,
        {
            "op": "task_status",
            "node_id": "n2",
            "statuses": [{"id": "T3", "state": "failed"}],
            "now": NOW,
        },
    )
    ok(s, {"op": "node_state", "node_id": "n2", "state": "down", "now": NOW})
    assert s.nodes["n2"]["state"] == "down"
    for tid in ("T2", "T3"):
        assert s.tasks[tid]["desired_state"] == "shutdown", tid
    assert s.tasks["T2"]["status"]["state"] == "orphaned"
    assert s.tasks["T1"]["desired_state"] == "running"
    assert s.apply({"op": "node_state", "node_id": "n2", "state": "down", "now": NOW})["noop"]
    refused(s, {"op": "node_state", "node_id": "ghost", "state": "down", "now": NOW}, 404, "id")


def test_node_down_keeps_remove_desired_state(s: ClusterState) -> None:
    ok(s, add_node("n2"))
    ok(s, svc_cmd("S1", "web", 1))
    ok(s, task_cmd("T1", "S1", 1, node="n2"))
    ok(s, {"op": "remove_service", "id": "S1", "now": NOW})
    ok(s, {"op": "node_state", "node_id": "n2", "state": "down", "now": NOW})
    assert s.tasks["T1"]["desired_state"] == "remove"


def test_ipam_errors_become_results(s: ClusterState) -> None:
    # An IPAMError escaping apply() would crash pysyncobj's apply thread.
    assert issubclass(IPAMError, Exception)
    r = s.apply(net_cmd("N1", "net", subnet="10.0.0.0/4"))
    assert r["error"]["field"] == "Subnet"


# --------------------------------------------------------------------------- determinism


def workload() -> list[dict]:
    cmds = [
        init_cmd(),
        add_node("n2"),
        add_node("n3"),
        net_cmd("N1", "front"),
        net_cmd("N2", "back", subnet="172.20.0.0/24"),
        net_cmd("N3", "front"),  # refused: duplicate
        svc_cmd("S1", "web", 3, ("N1", "N2")),
        svc_cmd("S2", "db", 2, ("N2",)),
    ]
    cmds += [task_cmd(f"T{i}", "S1", i, node=f"n{i}") for i in (1, 2, 3)]
    cmds += [
        task_cmd("T4", "S2", 1, node="n2"),
        task_cmd("T5", "S2", 2, node="n3"),
        {
            "op": "task_status",
            "node_id": "n2",
            "statuses": [{"id": "T2", "state": "running"}],
            "now": NOW,
        },
        {"op": "node_state", "node_id": "n3", "state": "down", "now": NOW},
        {"op": "remove_task", "id": "T3"},
        {"op": "remove_task", "id": "T5"},
        task_cmd("T6", "S1", 3, node="n1"),
        {"op": "remove_service", "id": "S2", "now": NOW},
        {"op": "remove_task", "id": "T4"},
        {"op": "remove_network", "id": "N2"},  # refused: S1 uses it
    ]
    return cmds


def test_same_log_same_state() -> None:
    a, b = ClusterState(), ClusterState()
    log = workload()
    results_a = [a.apply(c) for c in log]
    results_b = [b.apply(c) for c in copy.deepcopy(log)]
    assert results_a == results_b
    assert canonical(a) == canonical(b)
    assert pickle.dumps(a) == pickle.dumps(b)


def test_pickle_round_trip_continues_identically() -> None:
    log = workload()
    for cut in range(len(log) + 1):
        a = ClusterState()
        for c in log[:cut]:
            a.apply(c)
        b = pickle.loads(pickle.dumps(a))  # a restart from pysyncobj's full dump
        assert canonical(b) == canonical(a)
        more = [
            net_cmd("N9", "late"),
            svc_cmd("S9", "late", 2, ("N9",)) | {"now": NOW},
        ]
        for c in log[cut:] + more:
            assert a.apply(copy.deepcopy(c)) == b.apply(copy.deepcopy(c))
        assert canonical(a) == canonical(b)


# --------------------------------------------------------------------------- stateful


NODES = ("n1", "n2", "n3")
NET_NAMES = ("a", "b", "c")
SVC_NAMES = ("web", "db", "cache")
SUBNETS = (None, None, "10.0.0.0/24", "10.0.0.0/23", "172.16.5.0/28", "10.200.0.0/29")
REPORTS = ("starting", "running", "failed", "complete", "shutdown")


class ClusterMachine(RuleBasedStateMachine):
    """Random workloads; ``twin`` gets the same commands but is restarted from a pickle at
    random points, and must stay identical (results and state) to ``state``."""

    def __init__(self) -> None:
        super().__init__()
        self.state = ClusterState()
        self.twin = ClusterState()
        self.counter = 0
        self.apply(init_cmd(node_id="n1"))
        for n in NODES[1:]:
            self.apply(add_node(n))

    def next_id(self) -> str:
        self.counter += 1
        return f"id{self.counter:05d}"

    def apply(self, cmd: dict) -> dict:
        r1 = self.state.apply(copy.deepcopy(cmd))
        r2 = self.twin.apply(copy.deepcopy(cmd))
        assert r1 == r2, (cmd, r1, r2)
        return r1

    @rule(name=st.sampled_from(NET_NAMES), subnet=st.sampled_from(SUBNETS))
    def create_network(self, name: str, subnet: str | None) -> None:
        self.apply(net_cmd(self.next_id(), name, subnet=subnet))

    @precondition(lambda self: self.state.networks)
    @rule(data=st.data())
    def remove_network(self, data: st.DataObject) -> None:
        nid = data.draw(st.sampled_from(sorted(self.state.networks)))
        self.apply({"op": "remove_network", "id": nid})

    @rule(
        name=st.sampled_from(SVC_NAMES),
        replicas=st.integers(0, 5),
        data=st.data(),
    )
    def create_service(self, name: str, replicas: int, data: st.DataObject) -> None:
        nets = data.draw(
            st.lists(
                st.sampled_from(sorted(self.state.networks) or ["none"]), unique=True, max_size=2
            )
        )
        self.apply(svc_cmd(self.next_id(), name, replicas, tuple(nets)))

    @precondition(lambda self: self.state.services)
    @rule(data=st.data(), replicas=st.integers(0, 6), stale=st.booleans())
    def scale_service(self, data: st.DataObject, replicas: int, stale: bool) -> None:
        sid = data.draw(st.sampled_from(sorted(self.state.services)))
        svc = self.state.services[sid]
        new = copy.deepcopy(svc["spec"])
        new["Mode"] = {"Replicated": {"Replicas": replicas}}
        version = svc["version"] - 1 if stale else svc["version"]
        r = self.apply(
            {"op": "update_service", "id": sid, "version": version, "spec": new, "now": NOW}
        )
        assert ("error" in r) == stale

    @precondition(lambda self: self.state.services)
    @rule(data=st.data())
    def remove_service(self, data: st.DataObject) -> None:
        sid = data.draw(st.sampled_from(sorted(self.state.services)))
        self.apply({"op": "remove_service", "id": sid, "now": NOW})

    @rule()
    def schedule(self) -> None:
        cmds = scheduler.plan(self.state, self.next_id, NOW)
        for c in cmds:
            self.apply(c)

    @precondition(lambda self: self.state.tasks)
    @rule(data=st.data(), report=st.sampled_from(REPORTS), liar=st.booleans())
    def task_status(self, data: st.DataObject, report: str, liar: bool) -> None:
        tid = data.draw(st.sampled_from(sorted(self.state.tasks)))
        owner = self.state.tasks[tid]["node_id"]
        node = data.draw(st.sampled_from([n for n in NODES if n != owner])) if liar else owner
        before = self.state.tasks[tid]["status"]
        self.apply(
            {
                "op": "task_status",
                "node_id": node,
                "statuses": [{"id": tid, "state": report}],
                "now": NOW,
            }
        )
        if liar:
            assert self.state.tasks[tid]["status"] == before

    @rule(node=st.sampled_from(NODES), up=st.booleans())
    def node_state(self, node: str, up: bool) -> None:
        self.apply(
            {"op": "node_state", "node_id": node, "state": "ready" if up else "down", "now": NOW}
        )

    @rule()
    def restart_twin(self) -> None:
        self.twin = pickle.loads(pickle.dumps(self.twin))

    @invariant()
    def twins_agree(self) -> None:
        assert canonical(self.state) == canonical(self.twin)

    @invariant()
    def addresses_consistent(self) -> None:
        s = self.state
        assert s.ipam is not None
        s.ipam.check_invariants()
        owned: dict[str, dict[str, str]] = {nid: {} for nid in s.networks}
        for t in s.tasks.values():
            for a in t["networks"]:
                nid = a["network_id"]
                assert nid in s.networks, f"task {t['id']} attached to removed network {nid}"
                iface = ipaddress.ip_interface(a["address"])
                assert iface.network == ipaddress.ip_network(s.networks[nid]["subnet"])
                assert iface.ip != ipaddress.ip_address(s.networks[nid]["gateway"])
                assert a["address"] not in owned[nid].values(), f"duplicate IP {a['address']}"
                owned[nid][t["id"]] = a["address"]
        for svc in s.services.values():  # VIPs (issue 6): owned by "vip:<service id>"
            for nid, addr in (svc.get("endpoint") or {}).get("vips", {}).items():
                assert addr not in owned[nid].values(), f"duplicate IP {addr}"
                owned[nid]["vip:" + svc["id"]] = addr
        for nid, net in s.networks.items():
            # No leak (IPAM holds an IP nobody owns) and no phantom (a task IP IPAM forgot).
            assert s.ipam.used_ips(nid) == owned[nid]
            assert s.ipam.subnet_of(nid) == net["subnet"]
            assert s.ipam.vni_of(nid) == net["vni"]
        assert s.ipam.to_dict()["vnis"].keys() == s.networks.keys()
        assert s.ipam.to_dict()["networks"].keys() == s.networks.keys()

    @invariant()
    def one_running_task_per_slot(self) -> None:
        seen: set[tuple[str, int]] = set()
        for t in self.state.tasks.values():
            if t["desired_state"] == "running":
                key = (t["service_id"], t["slot"])
                assert key not in seen, f"slot {key} filled twice"
                seen.add(key)
                assert t["service_id"] in self.state.services

    @invariant()
    def no_running_task_on_a_down_node(self) -> None:
        for t in self.state.tasks.values():
            if t["desired_state"] == "running":
                assert self.state.nodes[t["node_id"]]["state"] == "ready"


ClusterMachine.TestCase.settings = settings(
    max_examples=150,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestClusterMachine = ClusterMachine.TestCase


def test_name_indexes_follow_commands_and_old_dumps_rebuild_them(s: ClusterState) -> None:
    ok(s, net_cmd("N1", "net"))
    ok(s, svc_cmd("S1", "web", 1, ("N1",)))
    assert s.network_by_name("net")["id"] == "N1" and s.service_by_name("web")["id"] == "S1"
    # A dump written before the indexes existed: unpickling rebuilds them.
    old = dict(vars(s))
    del old["network_names"], old["service_names"]
    restored = ClusterState.__new__(ClusterState)
    restored.__setstate__(old)
    assert restored.network_by_name("net")["id"] == "N1"
    assert restored.service_by_name("web")["id"] == "S1"
    ok(s, {"op": "remove_service", "id": "S1", "now": NOW})
    assert s.service_by_name("web") is None
    ok(s, {"op": "remove_network", "id": "N1"})
    assert s.network_by_name("net") is None
