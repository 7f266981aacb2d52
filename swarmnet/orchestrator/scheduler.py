"""The leader's orchestrator: from the replicated state, the commands that move it toward
what the services ask for. Pure: state and an ID source in, commands out.

The commands it emits are compare-and-set in the state machine (a slot is filled once, a
removed task is never resurrected), so running this twice, or on a deposed leader that still
believes it leads, never double-schedules: the log decides.
"""

from __future__ import annotations

from collections.abc import Callable

from swarmnet.raft.state import TASK_TERMINAL, ClusterState, service_replicas


def _node_load(state: ClusterState) -> tuple[dict[str, int], dict[tuple[str, str], int]]:
    total: dict[str, int] = {}
    per_service: dict[tuple[str, str], int] = {}
    for t in state.tasks.values():
        if t["desired_state"] != "running":
            continue
        total[t["node_id"]] = total.get(t["node_id"], 0) + 1
        key = (t["node_id"], t["service_id"])
        per_service[key] = per_service.get(key, 0) + 1
    return total, per_service


def plan(state: ClusterState, new_id: Callable[[], str], now: str) -> list[dict]:
    cmds: list[dict] = []
    ready = sorted(
        (n for n in state.nodes.values() if n["state"] == "ready" and n["availability"] == "active"),
        key=lambda n: (n["hostname"], n["id"]),
    )
    total, per_service = _node_load(state)

    for svc in sorted(state.services.values(), key=lambda s: s["id"]):
        want = service_replicas(svc["spec"])
        live = []
        for t in state.tasks.values():
            if t["service_id"] != svc["id"] or t["desired_state"] != "running":
                continue
            if t["node_id"] not in state.nodes:
                # Its node is gone (a state from before remove_node stopped such tasks):
                # stop it, so that its slot is filled elsewhere.
                cmds.append({"op": "task_desired", "id": t["id"], "desired": "shutdown"})
                continue
            live.append(t)
        have_slots = {t["slot"] for t in live}
        # Scale down: the highest slots go first, like Docker.
        for t in sorted(live, key=lambda t: -t["slot"]):
            if t["slot"] > want:
                cmds.append({"op": "task_desired", "id": t["id"], "desired": "shutdown"})
        if not ready:
            continue
        for slot in range(1, want + 1):
            if slot in have_slots:
                continue
            # Spread: fewest tasks of this service first, then fewest tasks overall.
            node = min(
                ready,
                key=lambda n: (per_service.get((n["id"], svc["id"]), 0), total.get(n["id"], 0)),
            )
            total[node["id"]] = total.get(node["id"], 0) + 1
            key = (node["id"], svc["id"])
            per_service[key] = per_service.get(key, 0) + 1
            cmds.append(
                {
                    "op": "create_task",
                    "id": new_id(),
                    "service_id": svc["id"],
                    "slot": slot,
                    "node_id": node["id"],
                    "now": now,
                }
            )

    # Garbage: tasks that should not run and have stopped (or whose node is gone) are
    # removed, which releases their addresses.
    for t in sorted(state.tasks.values(), key=lambda t: t["id"]):
        if t["desired_state"] == "running":
            continue
        node = state.nodes.get(t["node_id"])
        stopped = t["status"]["state"] in TASK_TERMINAL
        if stopped or node is None or node["state"] != "ready":
            cmds.append({"op": "remove_task", "id": t["id"]})
    return cmds
