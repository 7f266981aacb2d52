"""Service discovery and load balancing on a node (issue 6): a ``SandboxHook`` the agent
plugs into its worker (``worker.hooks``). Level-triggered: every pass recomputes DNS records,
per-sandbox VIP tables and the routing mesh from the assignment alone, so a task that stops,
is removed or whose node dies leaves DNS and every load balancer in the next pass.

- **Embedded DNS**: one ``DnsServer`` per agent; each running task's sandbox is attached
  with its networks in order (ingress excluded: like Docker, the ingress network is for the
  mesh, not for discovery); the name table is rebuilt from the assignment's ``services``
  and ``endpoints``. Tasks get ``nameserver 127.0.0.11`` / ``options ndots:0``. A sandbox is
  detached in ``before_reconcile``, i.e. before the overlay reconciler deletes it.
- **VIPs**: nftables in each task sandbox's own namespace (the LB author's recommendation):
  the OUTPUT hook DNATs ``VIP`` (every port: the all-ports mode, port 0 in ``lb.plan``) to
  the service's task IPs on that network. No SNAT: servers see their clients' real
  addresses, and no per-node LB endpoint IP is spent (pain point 12).
- **Routing mesh** (Docker's ``ingress_sbox`` design, kept because the overlay reconciler
  only gives a bridge L3 endpoints inside namespaces it manages): the node's ingress address
  lives on ``eth0`` of an ingress sandbox (an extra attachment of the overlay reconciler,
  ``extra_attachments``), joined to the host namespace by a veth pair on 169.254.231.0/30.
  The host's nftables (table ``swarmnet-ingress``) DNATs ``<underlay address>:PUBLISHED``
  to ``<task ingress IP>:TARGET`` (numgen over every live task in the cluster) and routes
  the ingress subnet to the sandbox, which masquerades to the node's ingress address so
  that replies come back through this node. Trade-off (pain point 7): the task sees the
  node's ingress address, not the client's; keeping the client address would need the task
  to route replies back through the node it came from (DSR or policy routing), which is
  what Docker cannot do either. ``mode=host`` publishes program the same DNAT, but only on
  a node running a task of the service and only to its local tasks (they reach them over
  the ingress network too, so host mode also masquerades here: a documented difference).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from swarmnet.dns.records import records_from_assignment
from swarmnet.dns.server import DnsConfig, DnsServer
from swarmnet.kernel.types import Addr, AddrAdd, LinkSet, Route, RouteAdd, VethAdd
from swarmnet.lb.ingress import enable_forwarding
from swarmnet.lb.nft import NftBackend, NftConfig
from swarmnet.lb.plan import ALL_PORTS, Backend, LBService, LBState
from swarmnet.overlay.plan import LocalAttachment, RemoteEndpoint, sandbox_name

if TYPE_CHECKING:
    from swarmnet.worker import Worker

log = logging.getLogger(__name__)

RESOLV_CONF = "nameserver 127.0.0.11\noptions ndots:0\n"
INGRESS_SBOX = "ingress-sbox"  # the "task id" part of the ingress sandbox's namespace name
HOST_IF, SBOX_IF = "sn-ingh", "sn-ings"
LINK_HOST, LINK_SBOX, LINK_PREFIX = "169.254.231.1", "169.254.231.2", 30
INGRESS_TABLE = "swarmnet-ingress"


def _ip(addr: str) -> str:
    return addr.split("/")[0]


class ServicesHook:
    def __init__(self, dns_config: DnsConfig | None = None):
        self.dns = DnsServer(config=dns_config)
        self._lbs: dict[str, NftBackend] = {}  # task sandbox -> its VIP table
        self._host_lb: NftBackend | None = None
        self._sbox_nat: NftBackend | None = None

    # ---- the seams ------------------------------------------------------------------

    def sbox(self, worker: Worker) -> str:
        return sandbox_name(worker.netns_prefix, INGRESS_SBOX)

    def extra_attachments(self, worker: Worker, assignment: dict) -> list[LocalAttachment]:
        """The node's ingress endpoint, for the overlay reconciler (it creates the sandbox,
        the veth into the ingress bridge, the address and the MAC remote nodes expect)."""
        node = assignment.get("node") or {}
        iid, addr = assignment.get("ingress_network_id"), node.get("ingress_addr")
        if not iid or not addr:
            return []
        return [
            LocalAttachment(
                task_id=INGRESS_SBOX,
                network_id=iid,
                address=addr,
                netns=self.sbox(worker),
                ifname="eth0",
            )
        ]

    def extra_remotes(self, worker: Worker, assignment: dict) -> list[RemoteEndpoint]:
        """Every ingress endpoint the manager lists: other nodes' ingress addresses
        (``node:<id>``; the tasks here reply to them) and every task's ingress address (the
        mesh forwards to them from every node, also where no local task joins the network,
        so gossip, which publishes per-network task endpoints to members, has none)."""
        iid = assignment.get("ingress_network_id")
        return [
            RemoteEndpoint(network_id=iid, ip=_ip(e["address"]), vtep=e["vtep"])
            for e in assignment.get("endpoints") or []
            if e["network_id"] == iid
        ]

    async def before_reconcile(self, worker: Worker, assignment: dict, sandboxes: set[str]) -> None:
        for netns in list(self.dns.sandboxes()):
            if netns not in sandboxes:
                self.dns.detach(netns)
        for netns in [n for n in self._lbs if n not in sandboxes]:
            self._lbs.pop(netns).close()  # its table goes with the namespace

    async def after_reconcile(self, worker: Worker, assignment: dict, running: list[dict]) -> None:
        worker.resolv_conf = RESOLV_CONF
        iid = assignment.get("ingress_network_id")
        nets = assignment.get("networks") or {}
        services = assignment.get("services") or []
        endpoints = [e for e in assignment.get("endpoints") or [] if e.get("task_name")]
        # DNS: one table for the node, scoped per asker by the resolver.
        tasks: dict[str, dict] = {}
        for e in endpoints:
            if e["network_id"] == iid:
                continue
            t = tasks.setdefault(
                e["task_id"],
                {
                    "id": e["task_id"],
                    "name": e["task_name"],
                    "service_name": e["service_name"],
                    "networks": [],
                },
            )
            t["networks"].append({"network_id": e["network_id"], "address": e["address"]})
        self.dns.update(
            records_from_assignment(
                [
                    {
                        "name": s["name"],
                        "endpoint_mode": s["endpoint_mode"],
                        "networks": [n for n in s["networks"] if n != iid],
                        "vips": {n: a for n, a in s["vips"].items() if n != iid},
                    }
                    for s in services
                ],
                tasks.values(),
            )
        )
        by_service: dict[tuple[str, str], list[dict]] = {}
        for e in endpoints:
            by_service.setdefault((e["service_id"], e["network_id"]), []).append(e)
        for t in running:
            netns = sandbox_name(worker.netns_prefix, t["id"])
            tnets = [
                a["network_id"]
                for a in t["networks"]
                if a["network_id"] != iid and a["network_id"] in nets
            ]
            try:
                await self.dns.attach(netns, tnets)
            except OSError as e:
                log.warning("dns: cannot serve sandbox %s: %s", netns, e)
            state = _vip_state(services, by_service, set(tnets))
            await worker.run_in_kernel_thread(self._sync_sandbox, netns, state)
        if iid and iid in nets and (assignment.get("node") or {}).get("ingress_addr"):
            await worker.run_in_kernel_thread(self._program_ingress, worker, assignment, by_service)

    async def close(self) -> None:
        await self.dns.close()
        for b in [*self._lbs.values(), self._host_lb, self._sbox_nat]:
            if b is not None:
                b.close()
        self._lbs.clear()

    # ---- kernel thread --------------------------------------------------------------

    def _sync_sandbox(self, netns: str, state: LBState) -> None:
        lb = self._lbs.get(netns)
        if lb is None:
            lb = self._lbs[netns] = NftBackend(netns=netns)
        lb.sync(state)

    def _program_ingress(
        self, worker: Worker, assignment: dict, by_service: dict[tuple[str, str], list[dict]]
    ) -> None:
        iid = assignment["ingress_network_id"]
        subnet = assignment["networks"][iid]["subnet"]
        sbox = self.sbox(worker)
        kernel = worker.kernel
        host = kernel.snapshot(None)
        ops: list = []
        if HOST_IF not in host.links:
            ops += [
                VethAdd(HOST_IF, SBOX_IF, 1500, peer_netns=sbox),
                AddrAdd(Addr(HOST_IF, f"{LINK_HOST}/{LINK_PREFIX}")),
                LinkSet(HOST_IF, up=True),
                AddrAdd(Addr(SBOX_IF, f"{LINK_SBOX}/{LINK_PREFIX}"), netns=sbox),
                LinkSet(SBOX_IF, netns=sbox, up=True),
                RouteAdd(Route("default", gateway=LINK_HOST, dev=SBOX_IF), netns=sbox),
            ]
            self._sbox_nat = None  # a new sandbox: its table must be made again
        if not any(r.dst == subnet for r in host.routes):
            ops.append(RouteAdd(Route(subnet, gateway=LINK_SBOX, dev=HOST_IF)))
        if ops:
            kernel.apply(ops)
            log.info("ingress: applied %d kernel ops", len(ops))
        enable_forwarding(None)
        enable_forwarding(sbox)
        if self._sbox_nat is None:
            self._sbox_nat = NftBackend(
                netns=sbox,
                config=NftConfig(
                    table=INGRESS_TABLE, masquerade_oif="eth0", masquerade_unless_from=subnet
                ),
            )
            self._sbox_nat.full_sync(LBState())
        if self._host_lb is None:
            self._host_lb = NftBackend(config=NftConfig(table=INGRESS_TABLE))
        self._host_lb.sync(_published_state(assignment, by_service, worker.vtep))


def _vip_state(
    services: list[dict], by_service: dict[tuple[str, str], list[dict]], nets: set[str]
) -> LBState:
    """A sandbox's VIP table: every vip-mode service on a network it is attached to."""
    out = []
    for s in services:
        if s["endpoint_mode"] != "vip":
            continue
        for nid, vip in s["vips"].items():
            if nid not in nets:
                continue
            backends = tuple(
                Backend(_ip(e["address"]), ALL_PORTS)
                for e in sorted(by_service.get((s["id"], nid), []), key=lambda e: e["address"])
            )
            for proto in ("tcp", "udp"):
                out.append(LBService(_ip(vip), proto, ALL_PORTS, backends))
    return LBState(frozenset(out))


def _published_state(
    assignment: dict, by_service: dict[tuple[str, str], list[dict]], underlay: str
) -> LBState:
    """The host's published ports: ingress mode on every node, to every live task;
    host mode only to this node's own tasks (none here: nothing is published)."""
    iid = assignment["ingress_network_id"]
    me = (assignment.get("node") or {}).get("id")
    out = []
    for s in assignment.get("services") or []:
        eps = sorted(by_service.get((s["id"], iid), []), key=lambda e: e["address"])
        for p in s.get("ports") or []:
            chosen = (
                eps if p["PublishMode"] == "ingress" else [e for e in eps if e["node_id"] == me]
            )
            if p["PublishMode"] == "host" and not chosen:
                continue
            backends = tuple(Backend(_ip(e["address"]), p["TargetPort"]) for e in chosen)
            out.append(LBService(underlay, p["Protocol"], p["PublishedPort"], backends))
    return LBState(frozenset(out))


__all__ = ["RESOLV_CONF", "ServicesHook"]
