"""Tests of the leader's scheduler (swarmnet/orchestrator/scheduler.py): a pure function from
the replicated state to commands; here the commands are applied to a real ClusterState."""

from __future__ import annotations

import copy
import itertools
import pickle
from collections import Counter
from collections.abc import Callable

import pytest

from swarmnet.orchestrator.scheduler import plan
from swarmnet.raft.state import ClusterState

NOW = "2025-01-01T00:00:00.000000Z"


def ids(prefix: str = "t") -> Callable[[], str]:
    counter = itertools.count(1)
    return lambda: f"{prefix}{next(counter):04d}"


def cluster(nodes: int = 3) -> ClusterState:
    s = ClusterState()
    r = s.apply(
        {
            "op": "init",
            "cluster_id": "c",
            "tokens": {"worker": "w", "manager": "m"},
            "digest": "d",
            "now": NOW,
            "node": {
                "node_id": "n1",
                "hostname": "h1",
                "addr": "198.51.100.1",
                "role": "manager",
                "secret_hash": "x",
            },
        }
    )
    assert r == {"ok": True}
    for i in range(2, nodes + 1):
        r = s.apply(
            {
                "op": "add_node",
                "node_id": f"n{i}",
                "hostname": f"h{i}",
                "addr": f"198.51.100.{i}",
                "role": "worker",
                "secret_hash": "y",
                "now": NOW,
            }
        )
        assert r == {"ok": True}
    return s


def service(s: ClusterState, sid: str, replicas: int, name: str | None = None) -> None:
    r = s.apply(
        {
            "op": "create_service",
            "id": sid,
            "spec": {
                "Name": name or sid,
                "TaskTemplate": {"ContainerSpec": {"Image": "sleep"}, "Networks": []},
                "Mode": {"Replicated": {"Replicas": replicas}},
            },
            "now": NOW,
        }
    )
    assert "error" not in r, r


def scale(s: ClusterState, sid: str, replicas: int) -> None:
    svc = s.services[sid]
    spec = copy.deepcopy(svc["spec"])
    spec["Mode"]["Replicated"]["Replicas"] = replicas
    r = s.apply(
        {"op": "update_service", "id": sid, "version": svc["version"], "spec": spec, "now": NOW}
    )
    assert "error" not in r, r


def run(s: ClusterState, new_id: Callable[[], str]) -> list[dict]:
    cmds = plan(s, new_id, NOW)
    for c in cmds:
        r = s.apply(c)
        assert "error" not in r and "noop" not in r, (c, r)
    return cmds


def per_node(s: ClusterState, sid: str | None = None) -> Counter:
    return Counter(
        t["node_id"]
        for t in s.tasks.values()
        if t["desired_state"] == "running" and (sid is None or t["service_id"] == sid)
    )


def report(s: ClusterState, tid: str, state: str) -> None:
    t = s.tasks[tid]
    s.apply(
        {
            "op": "task_status",
            "node_id": t["node_id"],
            "statuses": [{"id": tid, "state": state}],
            "now": NOW,
        }
    )
    assert s.tasks[tid]["status"]["state"] == state


@pytest.mark.parametrize(("replicas", "each"), [(3, 1), (6, 2), (9, 3)])
def test_spread_evenly(replicas: int, each: int) -> None:
    s = cluster(3)
    service(s, "S1", replicas)
    cmds = run(s, ids())
    assert [c["op"] for c in cmds] == ["create_task"] * replicas
    assert sorted(c["slot"] for c in cmds) == list(range(1, replicas + 1))
    assert per_node(s) == {"n1": each, "n2": each, "n3": each}
    assert plan(s, ids(), NOW) == []  # converged


def test_existing_load_respected() -> None:
    s = cluster(3)
    service(s, "S0", 2)
    new_id = ids()
    run(s, new_id)
    assert per_node(s) == {"n1": 1, "n2": 1}
    service(s, "S1", 1)
    run(s, new_id)
    # Within S1 every node is equal (0), so the least loaded node overall wins.
    assert per_node(s, "S1") == {"n3": 1}
    service(s, "S2", 4)
    run(s, new_id)
    # Spread per service first: S2 gets at most 2 on any node; totals stay within one.
    assert max(per_node(s, "S2").values()) == 2
    totals = per_node(s)
    assert max(totals.values()) - min(totals.values()) <= 1


def test_scale_down_removes_highest_slots_first() -> None:
    s = cluster(3)
    service(s, "S1", 5)
    new_id = ids()
    run(s, new_id)
    scale(s, "S1", 2)
    cmds = plan(s, new_id, NOW)
    slot_of = {t["id"]: t["slot"] for t in s.tasks.values()}
    assert [c["op"] for c in cmds] == ["task_desired"] * 3
    assert [slot_of[c["id"]] for c in cmds] == [5, 4, 3]
    assert all(c["desired"] == "shutdown" for c in cmds)
    for c in cmds:
        s.apply(c)
    assert sorted(t["slot"] for t in s.tasks.values() if t["desired_state"] == "running") == [1, 2]
    # The shut-down tasks still run (no report yet): not garbage yet, nothing to do.
    assert plan(s, new_id, NOW) == []
    for c in cmds:
        report(s, c["id"], "shutdown")
    gc = run(s, new_id)
    assert sorted(c["id"] for c in gc) == sorted(c["id"] for c in cmds)
    assert {c["op"] for c in gc} == {"remove_task"}
    assert len(s.tasks) == 2


def test_scale_to_zero_with_no_ready_nodes_still_scales_down() -> None:
    s = cluster(1)
    service(s, "S1", 2)
    new_id = ids()
    run(s, new_id)
    s.nodes["n1"]["availability"] = "drain"
    scale(s, "S1", 0)
    cmds = plan(s, new_id, NOW)
    assert [c["op"] for c in cmds] == ["task_desired", "task_desired"]


def test_down_nodes_get_no_tasks_and_orphans_are_replaced() -> None:
    s = cluster(3)
    service(s, "S1", 3)
    new_id = ids()
    run(s, new_id)
    lost = {t["id"]: t["slot"] for t in s.tasks.values() if t["node_id"] == "n2"}
    assert len(lost) == 1
    s.apply({"op": "node_state", "node_id": "n2", "state": "down", "now": NOW})
    cmds = run(s, new_id)
    creates = [c for c in cmds if c["op"] == "create_task"]
    removes = [c for c in cmds if c["op"] == "remove_task"]
    assert [c["slot"] for c in creates] == list(lost.values())
    assert all(c["node_id"] != "n2" for c in creates)
    assert sorted(c["id"] for c in removes) == sorted(lost)
    assert per_node(s) == {"n1": 2, "n3": 1} or per_node(s) == {"n1": 1, "n3": 2}
    # A new service spreads over the ready nodes only.
    service(s, "S2", 4)
    run(s, new_id)
    assert "n2" not in per_node(s, "S2")


def test_drained_node_gets_no_new_tasks() -> None:
    s = cluster(2)
    s.nodes["n2"]["availability"] = "drain"
    service(s, "S1", 4)
    run(s, ids())
    assert per_node(s) == {"n1": 4}


def test_garbage_collection_removes_stopped_tasks_only() -> None:
    s = cluster(2)
    service(s, "S1", 2)
    new_id = ids()
    run(s, new_id)
    t1, t2 = sorted(s.tasks)
    s.apply({"op": "task_desired", "id": t1, "desired": "shutdown"})
    s.apply({"op": "task_desired", "id": t2, "desired": "shutdown"})
    report(s, t1, "complete")
    report(s, t2, "running")  # still stopping: keep it (and its address) for now
    cmds = plan(s, new_id, NOW)
    removes = [c["id"] for c in cmds if c["op"] == "remove_task"]
    assert removes == [t1]
    # Two replacements, because neither shut-down task counts as running.
    assert sorted(c["slot"] for c in cmds if c["op"] == "create_task") == [1, 2]


def test_removed_service_tasks_are_collected() -> None:
    s = cluster(2)
    service(s, "S1", 2)
    new_id = ids()
    run(s, new_id)
    s.apply({"op": "remove_service", "id": "S1", "now": NOW})
    assert plan(s, new_id, NOW) == []  # still running somewhere: wait for the reports
    for tid in list(s.tasks):
        report(s, tid, "shutdown")
    run(s, new_id)
    assert s.tasks == {}


def test_plan_is_deterministic_given_new_id() -> None:
    s = cluster(3)
    for i, n in enumerate((3, 1, 4, 1, 5)):
        service(s, f"S{i}", n)
    run(s, ids("a"))
    s.apply({"op": "node_state", "node_id": "n3", "state": "down", "now": NOW})
    scale(s, "S2", 2)
    twin = pickle.loads(pickle.dumps(s))
    first = plan(s, ids("b"), NOW)
    assert first == plan(s, ids("b"), NOW)
    assert first == plan(twin, ids("b"), NOW)
    assert plan(s, ids("b"), NOW) != plan(s, ids("c"), NOW)  # the IDs do come from new_id
    assert first  # the scenario does have work to do


def test_plan_does_not_mutate_state() -> None:
    s = cluster(3)
    service(s, "S1", 3)
    before = pickle.dumps(s)
    plan(s, ids(), NOW)
    assert pickle.dumps(s) == before


def test_a_node_that_left_and_was_removed_gets_its_slots_refilled() -> None:
    """`swarm leave` on a worker: its tasks report "shutdown" while still desired running;
    then `node rm --force`. The slots must be filled on the remaining nodes."""
    s = cluster(3)
    service(s, "S1", 3)
    run(s, ids())
    gone = [tid for tid, t in s.tasks.items() if t["node_id"] == "n3"]
    assert gone
    for tid in gone:
        report(s, tid, "shutdown")
    r = s.apply({"op": "remove_node", "node_id": "n3", "force": True, "now": NOW})
    assert r == {"ok": True}, r
    assert all(s.tasks[tid]["desired_state"] == "shutdown" for tid in gone)
    run(s, ids("u"))
    assert sum(per_node(s, "S1").values()) == 3 and "n3" not in per_node(s)
    assert plan(s, ids("v"), NOW) == []  # converged


def test_a_task_on_a_vanished_node_is_stopped_and_replaced() -> None:
    """State from before remove_node stopped such tasks: the scheduler repairs it."""
    s = cluster(3)
    service(s, "S1", 3)
    run(s, ids())
    stale = next(tid for tid, t in s.tasks.items() if t["node_id"] == "n3")
    del s.nodes["n3"]  # as an older state machine left it
    cmds = run(s, ids("u"))
    assert {"op": "task_desired", "id": stale, "desired": "shutdown"} in cmds
    run(s, ids("v"))  # the garbage pass removes it
    assert stale not in s.tasks
    assert sum(per_node(s, "S1").values()) == 3
