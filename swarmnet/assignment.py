"""What one node is told: its assignment (tasks, their networks, the endpoints of those
networks, services, the ingress, the gossip key ring, the IPsec key set), computed from the
replicated state. Pure: a function of the state, the same on every manager, so a worker that
fails over to another manager gets the same document."""

from __future__ import annotations

import hashlib

from swarmnet.ipsec.control import ipsec_assignment
from swarmnet.raft.state import TASK_TERMINAL, ClusterState

GOSSIP_PORT = 7946  # swarmnet.gossip_endpoints.GOSSIP_PORT (Docker's gossip port)


def gossip_for(state: ClusterState) -> dict | None:
    """The gossip key ring and the gossip addresses of the nodes not known to be down: what
    a node needs to start its gossip member and join the pool."""
    ring = (state.cluster or {}).get("gossip")
    if not ring:
        return None
    peers = sorted(
        f"{n['addr']}:{GOSSIP_PORT}" for n in state.nodes.values() if n.get("state") != "down"
    )
    return {"keys": list(ring["keys"]), "primary": ring["primary"], "peers": peers}


def gossip_digest(ring: dict) -> str:
    """Same as swarmnet.gossip_endpoints.keyring_digest: what nodes acknowledge."""
    h = hashlib.sha256(str(ring.get("primary", "")).encode())
    for k in sorted(ring.get("keys") or []):
        h.update(b"," + str(k).encode())
    return h.hexdigest()[:16]


def assignment_for(state: ClusterState, node_id: str) -> dict:
    """Everything one node needs to run its tasks and program its overlays."""
    node = state.nodes.get(node_id)
    tasks = [t for t in state.tasks.values() if t["node_id"] == node_id]
    net_ids = {a["network_id"] for t in tasks for a in t["networks"]}
    # The routing mesh answers on EVERY node (issue 6): every node joins the ingress
    # network, with or without a local task on it.
    ingress = state.ingress_network()
    if ingress is not None:
        net_ids.add(ingress["id"])
    networks = {
        nid: {k: state.networks[nid][k] for k in ("id", "name", "vni", "subnet")}
        | {"encrypted": bool(state.networks[nid].get("encrypted"))}
        for nid in net_ids
        if nid in state.networks
    }
    endpoints = []
    for t in state.tasks.values():
        if t["desired_state"] != "running" or t["status"]["state"] in TASK_TERMINAL:
            continue
        tnode = state.nodes.get(t["node_id"])
        if tnode is None or tnode["state"] != "ready":
            continue
        for a in t["networks"]:
            if a["network_id"] in networks:
                endpoints.append(
                    {
                        "network_id": a["network_id"],
                        "task_id": t["id"],
                        "address": a["address"],
                        "vtep": tnode["addr"],
                        "node_id": tnode["id"],
                        "service_id": t["service_id"],
                        "service_name": t["service_name"],
                        "task_name": f"{t['service_name']}.{t['slot']}",
                    }
                )
    if ingress is not None:
        # Each node's own ingress endpoint (the mesh's SNAT address): remote nodes need its
        # VTEP so that the replies of their tasks find their way back.
        for n in sorted(state.nodes.values(), key=lambda n: n["id"]):
            if n["state"] == "ready" and n.get("ingress_addr"):
                endpoints.append(
                    {
                        "network_id": ingress["id"],
                        "task_id": "node:" + n["id"],
                        "address": n["ingress_addr"],
                        "vtep": n["addr"],
                        "node_id": n["id"],
                    }
                )
    # What DNS and the load balancers need: every service on a network this node has.
    services = []
    for svc in sorted(state.services.values(), key=lambda s: s["id"]):
        snets = state.service_networks(svc)
        if not any(nid in networks for nid in snets):
            continue
        ep = svc.get("endpoint") or {}
        services.append(
            {
                "id": svc["id"],
                "name": svc["spec"]["Name"],
                "endpoint_mode": (svc["spec"].get("EndpointSpec") or {}).get("Mode") or "vip",
                "networks": snets,
                "vips": dict(ep.get("vips") or {}),
                "ports": [dict(p) for p in ep.get("ports") or []],
            }
        )
    out_tasks = []
    for t in tasks:
        svc = state.services.get(t["service_id"])
        out_tasks.append(
            {
                "id": t["id"],
                "name": f"{t['service_name']}.{t['slot']}",
                "service_id": t["service_id"],
                "service_name": t["service_name"],
                "slot": t["slot"],
                "desired_state": t["desired_state"] if svc is not None else "remove",
                "networks": t["networks"],
                "spec": svc["spec"] if svc is not None else None,
            }
        )
    return {
        "index": state.index,
        "node": None
        if node is None
        else {
            "id": node["id"],
            "state": node["state"],
            "role": node["role"],
            "addr": node["addr"],
            "ingress_addr": node.get("ingress_addr"),
        },
        "tasks": out_tasks,
        "networks": networks,
        "endpoints": endpoints,
        # Key sets only in assignments (mTLS), only to nodes on an encrypted network.
        "ipsec": ipsec_assignment(state, node_id),
        "services": services,
        "ingress_network_id": None if ingress is None else ingress["id"],
    }
