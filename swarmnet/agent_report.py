"""What an agent reports about itself: Docker's ``/info``, the gossip view, and the counters
of every part for ``/swarmnet/metrics`` and ``/metrics``. Read-only over the agent's roles."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from swarmnet.api import docker as D

if TYPE_CHECKING:
    from swarmnet.agent import Agent

log = logging.getLogger(__name__)


def gossip_status(agent: Agent) -> dict:
    g = agent.gossip
    node = g.node if g is not None else None
    if node is None:
        return {"running": False}
    return {
        "running": True,
        "name": node.name,
        "address": f"{node.address[0]}:{node.address[1]}",
        "members": [
            {"name": m.name, "addr": f"{m.address[0]}:{m.address[1]}", "state": m.state.name}
            for m in node.members(include_dead=True)
        ],
        "networks": {nid: len(node.entries(nid)) for nid in sorted(node.networks())},
        "keys": len(node.keyring.keys),
        "metrics": node.metrics(),
    }


async def metrics(agent: Agent) -> dict:
    """Counters of every part of this node, for ``GET /swarmnet/metrics`` (JSON) and
    ``GET /metrics`` (Prometheus text). The XFRM counters are read from the kernel now
    (on the worker's kernel thread), not from the last sync's snapshot, so that a burst
    of tampered packets shows at once."""
    out: dict[str, dict] = {}
    g = agent.gossip
    if g is not None:
        out["gossip"] = dict(g.metrics())
    w = agent.worker
    if w is not None and hasattr(w, "hooks"):
        out["worker"] = {"fastpath_fallbacks": int(getattr(w, "fastpath_fallbacks", 0))}
        for h in w.hooks:
            dns = getattr(h, "dns", None)
            if dns is not None:
                out["dns"] = dns.counters.as_dict()
        hook = getattr(w, "ipsec", None)
        if hook is not None:
            try:
                out["ipsec"] = await w.run_in_kernel_thread(hook.fresh_metrics)
            except Exception as e:  # metrics must not fail because XFRM is unreadable
                log.warning("metrics: xfrm counters unreadable: %s", e)
                out["ipsec"] = hook.metrics()
    return out


def info(agent: Agent) -> dict:
    ident = agent.identity
    swarm: dict = {
        "NodeID": ident["node_id"] if ident else "",
        "NodeAddr": agent.opts.advertise_addr,
        "LocalNodeState": "active" if ident else "inactive",
        "ControlAvailable": bool(ident and ident["role"] == "manager"),
        "Error": "",
        "RemoteManagers": [{"NodeID": "", "Addr": m} for m in (ident or {}).get("managers", [])],
    }
    if agent.manager is not None and agent.manager.store is not None:
        st = agent.manager.store.read(
            lambda s: (
                len(s.nodes),
                sum(1 for n in s.nodes.values() if n["role"] == "manager"),
                s.cluster,
            )
        )
        swarm["Nodes"], swarm["Managers"] = st[0], st[1]
        if st[2] is not None:
            swarm["Cluster"] = {"ID": st[2]["id"], "Version": {"Index": st[2]["version"]}}
    running = len(agent.worker.supervisor.tasks()) if agent.worker else 0
    return {
        "ID": ident["node_id"] if ident else "",
        "Name": agent.opts.hostname,
        "ServerVersion": D.ENGINE_VERSION,
        "OperatingSystem": "linux",
        "OSType": "linux",
        "Architecture": "x86_64",
        "Containers": running,
        "ContainersRunning": running,
        "Swarm": swarm,
    }
