"""Service discovery and load balancing on a node (issue 6): a ``SandboxHook`` the agent
plugs into its worker (``worker.hooks``). Level-triggered: every pass recomputes DNS records,
per-sandbox VIP tables and the routing mesh from two inputs:

- **Services** (name, VIPs, endpoint mode, published ports): the assignment's ``services``.
  They change only through the managers anyway.
- **Tasks** (id, name, service, network, address): the gossip tables
  (``GossipEndpoints.task_endpoints``) for every network whose table this node holds, plus
  this node's own running tasks from the assignment; the managers' ``endpoints`` list only
  for the other networks, and for all of them when the worker has no gossip (tests, a
  stand-in endpoint source).
- **When**: after each worker pass (``after_reconcile``), and on every change of the gossip
  tables (``GossipEndpoints.add_listener``, registered on the first pass): changes are
  coalesced (``RERENDER_DELAY_S``) and DNS plus the LB state of every sandbox the last pass
  set up are rendered again, without the worker (its fast path only programs FDB/neighbour
  deltas). So a task that exits or is removed, or whose node dies (gossip declares it
  failed), leaves DNS and every load balancer one gossip propagation after its owner (or
  failure detection) says so, with no manager in the path.

- **Embedded DNS**: one ``DnsServer`` per agent; each running task's sandbox is attached
  with its networks in order (ingress excluded: like Docker, the ingress network is for the
  mesh, not for discovery); the name table is rebuilt from the assignment's ``services``
  and ``endpoints``. Tasks get ``nameserver 127.0.0.11`` / ``options ndots:0``. A sandbox is
  detached in ``before_reconcile``, i.e. before the overlay reconciler deletes it.
- **VIPs**: in each task sandbox's own namespace (the LB author's recommendation), with the
  backend ``lb.backend.choose_backend(lb_backend, netns)`` picks (IPVS where the kernel
  has it, nftables otherwise; ``--lb-backend`` forces one): ``VIP`` (every port: the
  all-ports mode, port 0 in ``lb.plan``) goes to the service's task IPs on that network.
  No SNAT: servers see their clients' real addresses, and no per-node LB endpoint IP is
  spent (pain point 12). The routing mesh's two tables stay nftables (they need its
  masquerade and host-table options).
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

import asyncio
import ipaddress
import logging
import time
from typing import TYPE_CHECKING

from swarmnet.dns.records import records_from_assignment
from swarmnet.dns.server import DnsConfig, DnsServer
from swarmnet.gossip_endpoints import GossipEndpoints
from swarmnet.kernel.types import Addr, AddrAdd, LinkSet, Route, RouteAdd, VethAdd
from swarmnet.lb.backend import LBBackend, Prefer, choose_backend
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
RERENDER_DELAY_S = 0.02
"""A gossip change waits this long before DNS and LB are rendered again, so that a burst (a
node's death hides all its entries at once; a bulk sync brings hundreds) costs one render;
the worker coalesces its own resyncs the same way (WorkerConfig.resync_min_s)."""
INGRESS_RECHECK_S = 30.0
"""The routing mesh's plumbing (``_program_ingress``: a snapshot of the host namespace, two
sysctls, nftables) is checked when its inputs change, after every full kernel pass of the
worker (which may have recreated the ingress sandbox, and its veth with it), and at least
this often otherwise (the worker's own repair period, WorkerConfig.resync_s). Not on every
pass: most passes only add or remove another node's endpoint, and the snapshot's parsing
held the agent's interpreter lock for tens of ms on each of them (issue 5: the receiving
agent's loop could not read gossip meanwhile)."""


def _ip(addr: str) -> str:
    return addr.split("/")[0]


def _addr_key(e: dict) -> ipaddress.IPv4Address:
    """Backends in address order, whatever the source wrote (``/24`` or not): the same set
    must give the same backend list, or every render would reshuffle the LB's slots."""
    return ipaddress.IPv4Address(_ip(e["address"]))


class ServicesHook:
    def __init__(
        self,
        dns_config: DnsConfig | None = None,
        lb_backend: Prefer = "auto",
        rerender_delay_s: float = RERENDER_DELAY_S,
    ):
        if lb_backend not in ("auto", "ipvs", "nft"):
            raise ValueError(f"lb backend must be auto, ipvs or nft, not {lb_backend!r}")
        self.dns = DnsServer(config=dns_config)
        self.lb_backend: Prefer = lb_backend
        self.rerender_delay_s = rerender_delay_s
        self._lbs: dict[str, LBBackend] = {}  # task sandbox -> its VIP table
        self._host_lb: NftBackend | None = None
        self._sbox_nat: NftBackend | None = None
        # What the last pass rendered, for the renders between passes: its assignment (the
        # service definitions), the task sandboxes it set up with their networks, and
        # the states applied (a render skips what did not change).
        self._worker: Worker | None = None
        self._gossip: GossipEndpoints | None = None
        self._assignment: dict | None = None
        self._running: list[dict] = []
        self._sandboxes: dict[str, list[str]] = {}
        self._dns_in: tuple[list[dict], list[dict]] | None = None
        self._lb_states: dict[str, LBState] = {}
        self._published: LBState | None = None
        # When the ingress plumbing was last checked: (its inputs, the worker's full-pass
        # count, monotonic time); None: never, or the check failed.
        self._ingress_checked: tuple[tuple, int, float] | None = None
        self._render_lock = asyncio.Lock()
        self._rerender: asyncio.Task | None = None
        self._rerender_again = False
        self.rerenders = 0  # renders caused by gossip changes (tests, metrics)

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
        mesh forwards to them from every node; gossip has them too once the ingress table
        is synced, and the overlay keeps one entry per address)."""
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
        for netns in [n for n in self._sandboxes if n not in sandboxes]:
            del self._sandboxes[netns]  # no render between passes may touch it again
            self._lb_states.pop(netns, None)

    async def after_reconcile(self, worker: Worker, assignment: dict, running: list[dict]) -> None:
        worker.resolv_conf = RESOLV_CONF
        self._worker = worker
        endpoints = getattr(worker, "endpoints", None)
        gossip = endpoints if isinstance(endpoints, GossipEndpoints) else None
        if gossip is not self._gossip:  # first pass, or the agent replaced its gossip
            if self._gossip is not None:
                self._gossip.remove_listener(self._on_gossip)
            self._gossip = gossip
            if gossip is not None:
                gossip.add_listener(self._on_gossip)
        iid = assignment.get("ingress_network_id")
        nets = assignment.get("networks") or {}
        async with self._render_lock:
            self._assignment, self._running = assignment, running
            for t in running:
                netns = sandbox_name(worker.netns_prefix, t["id"])
                tnets = [
                    a["network_id"]
                    for a in t["networks"]
                    if a["network_id"] != iid and a["network_id"] in nets
                ]
                self._sandboxes[netns] = tnets
                try:
                    await self.dns.attach(netns, tnets)
                except OSError as e:
                    log.warning("dns: cannot serve sandbox %s: %s", netns, e)
            await self._render(worker, full=True)

    async def close(self) -> None:
        if self._gossip is not None:
            self._gossip.remove_listener(self._on_gossip)
        if self._rerender is not None:
            self._rerender.cancel()
            await asyncio.gather(self._rerender, return_exceptions=True)
        await self.dns.close()
        for b in [*self._lbs.values(), self._host_lb, self._sbox_nat]:
            if b is not None:
                b.close()
        self._lbs.clear()

    # ---- rendering ------------------------------------------------------------------

    def _on_gossip(self, _ev: object) -> None:
        """A gossip table changed (on the loop, inside the gossip pump: do not block)."""
        if self._assignment is None:
            return  # no pass yet: the first one renders everything
        if self._rerender is not None and not self._rerender.done():
            self._rerender_again = True
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # not on the loop (a test feeding events by hand): the next pass renders
        self._rerender = loop.create_task(self._rerender_loop(), name="services-rerender")

    async def _rerender_loop(self) -> None:
        while True:
            self._rerender_again = False
            await asyncio.sleep(self.rerender_delay_s)  # coalesce the burst
            worker = self._worker
            if worker is None:
                return
            async with self._render_lock:
                try:
                    await self._render(worker, full=False)
                    self.rerenders += 1
                except Exception:
                    # The next change or worker pass renders again (the states that failed
                    # were forgotten, so they are applied in full then).
                    log.exception("services: render after a gossip change failed")
            if not self._rerender_again:
                return

    async def _render(self, worker: Worker, *, full: bool) -> None:
        """DNS and every LB from the last pass's services and sandboxes and the current
        task endpoints. ``full`` (a worker pass): new sandboxes get their LB table and the
        routing mesh is set up; otherwise only what exists is updated, and only what
        changed (the sandboxes set up by a pass are the only ones known to exist)."""
        assignment = self._assignment
        assert assignment is not None
        iid = assignment.get("ingress_network_id")
        nets = assignment.get("networks") or {}
        services = assignment.get("services") or []
        endpoints = self._task_endpoints(worker, assignment, self._running)
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
        dns_in = (
            [
                {
                    "name": s["name"],
                    "endpoint_mode": s["endpoint_mode"],
                    "networks": [n for n in s["networks"] if n != iid],
                    "vips": {n: a for n, a in s["vips"].items() if n != iid},
                }
                for s in services
            ],
            sorted(tasks.values(), key=lambda t: t["id"]),
        )
        # Only what changed is rendered, on worker passes too: the DNS table is a pure
        # function of ``dns_in`` (Records has no equality: compare its input), and an LB
        # backend's sync of the state it already holds is a no-op (SyncingBackend diffs
        # against what it applied), so neither is worth a rebuild or a kernel-thread trip.
        if dns_in != self._dns_in:
            self.dns.update(records_from_assignment(*dns_in))
            self._dns_in = dns_in
        by_service: dict[tuple[str, str], list[dict]] = {}
        for e in endpoints:
            by_service.setdefault((e["service_id"], e["network_id"]), []).append(e)
        vip_states = _VipStates(services, by_service)
        for netns, tnets in list(self._sandboxes.items()):
            state = vip_states.for_networks(tnets)
            if self._lb_states.get(netns) == state and netns in self._lbs:
                continue
            self._lb_states.pop(netns, None)  # unknown until the sync returns
            if await worker.run_in_kernel_thread(self._sync_sandbox, netns, state, full):
                self._lb_states[netns] = state
        if iid and iid in nets and (assignment.get("node") or {}).get("ingress_addr"):
            published = _published_state(assignment, by_service, worker.vtep)
            if full and self._ingress_due(worker, assignment):
                self._published = None
                self._ingress_checked = None  # unknown until it returns
                await worker.run_in_kernel_thread(self._program_ingress, worker, assignment)
                self._ingress_checked = self._ingress_stamp(worker, assignment)
            if published != self._published and self._host_lb is not None:
                self._published = None
                await worker.run_in_kernel_thread(self._host_lb.sync, published)
                self._published = published

    def _ingress_stamp(self, worker: Worker, assignment: dict) -> tuple[tuple, int, float]:
        iid = assignment["ingress_network_id"]
        node = assignment.get("node") or {}
        inputs = (
            iid,
            (assignment["networks"].get(iid) or {}).get("subnet"),
            node.get("ingress_addr"),
            self.sbox(worker),
        )
        reconciler = getattr(worker, "reconciler", None)
        return inputs, getattr(reconciler, "passes", -1), time.monotonic()

    def _ingress_due(self, worker: Worker, assignment: dict) -> bool:
        """Whether a pass must check the routing mesh's plumbing (see INGRESS_RECHECK_S)."""
        last = self._ingress_checked
        if last is None or self._host_lb is None or self._sbox_nat is None:
            return True
        inputs, passes, _ = self._ingress_stamp(worker, assignment)
        return (
            inputs != last[0]
            or passes != last[1]
            or passes < 0
            or time.monotonic() - last[2] >= INGRESS_RECHECK_S
        )

    def _task_endpoints(self, worker: Worker, assignment: dict, running: list[dict]) -> list[dict]:
        """Every task endpoint that DNS and the LBs may use, in the managers' ``endpoints``
        shape (``network_id, task_id, task_name, service_id, service_name, address,
        node_id``): our own running tasks (the assignment, minus tasks whose process is not
        running now: GossipEndpoints.task_state), other nodes'
        from the gossip table of each network we hold, the managers' list for the rest."""
        me = (assignment.get("node") or {}).get("id") or getattr(worker, "node_id", "")
        nets = assignment.get("networks") or {}
        out: dict[tuple[str, str], dict] = {}
        down = self._gossip.down_tasks() if self._gossip is not None else frozenset()
        for t in running:
            if t["id"] in down:
                continue  # its process exited: no name, no backend until it runs again
            for a in t["networks"]:
                if a["network_id"] in nets:
                    out[(t["id"], a["network_id"])] = {
                        "network_id": a["network_id"],
                        "task_id": t["id"],
                        "task_name": t["name"],
                        "service_id": t["service_id"],
                        "service_name": t["service_name"],
                        "address": a["address"],
                        "node_id": me,
                    }
        held: set[str] = set()
        if self._gossip is not None:
            held = self._gossip.joined_networks()
            ids = {s["name"]: s["id"] for s in assignment.get("services") or []}
            for e in self._gossip.task_endpoints(assignment):
                if not e["task_name"] or not e["service_name"]:
                    continue  # not a task of a service (nothing to name it by)
                if not e["service_id"]:  # an older agent's entry: the name gives the id
                    e = {**e, "service_id": ids.get(e["service_name"], "")}
                out.setdefault((e["task_id"], e["network_id"]), e)
        for e in assignment.get("endpoints") or []:
            if e.get("task_name") and e["network_id"] not in held:
                out.setdefault((e["task_id"], e["network_id"]), e)
        return list(out.values())

    # ---- kernel thread --------------------------------------------------------------

    def _sync_sandbox(self, netns: str, state: LBState, create: bool) -> bool:
        """Returns False when the sandbox's table is gone (the sandbox is being deleted, or
        a render between passes reached a sandbox no pass has set up)."""
        lb = self._lbs.get(netns)
        if lb is None:
            if not create or netns not in self._sandboxes:
                return False
            lb = self._lbs[netns] = choose_backend(self.lb_backend, netns)
        lb.sync(state)
        return True

    def _program_ingress(self, worker: Worker, assignment: dict) -> None:
        """The routing mesh's plumbing (idempotent): the veth between host and ingress
        sandbox, the route to the ingress subnet, forwarding, the sandbox's masquerade and
        the host's published-ports table (its content is synced by ``_render``)."""
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


class _VipStates:
    """Every sandbox's VIP table for one render. Sandboxes on the same networks share one
    table, and a service's backends on a network are built once per render, not once per
    sandbox: building them (address validation in ``lb.plan``) was a visible part of each
    pass's time on the loop with tens of tasks."""

    def __init__(self, services: list[dict], by_service: dict[tuple[str, str], list[dict]]) -> None:
        self._services = services
        self._by_service = by_service
        self._vips: dict[tuple[str, str], tuple[LBService, LBService]] = {}
        self._states: dict[frozenset[str], LBState] = {}

    def for_networks(self, nets: list[str]) -> LBState:
        """A sandbox's VIP table: every vip-mode service on a network it is attached to."""
        key = frozenset(nets)
        state = self._states.get(key)
        if state is None:
            out = []
            for s in self._services:
                if s["endpoint_mode"] != "vip":
                    continue
                for nid, vip in s["vips"].items():
                    if nid in key:
                        out += self._vip(s, nid, vip)
            state = self._states[key] = LBState(frozenset(out))
        return state

    def _vip(self, s: dict, nid: str, vip: str) -> tuple[LBService, LBService]:
        got = self._vips.get((s["id"], nid))
        if got is None:
            backends = tuple(
                Backend(_ip(e["address"]), ALL_PORTS)
                for e in sorted(self._by_service.get((s["id"], nid), []), key=_addr_key)
            )
            got = self._vips[(s["id"], nid)] = tuple(  # type: ignore[assignment]
                LBService(_ip(vip), proto, ALL_PORTS, backends) for proto in ("tcp", "udp")
            )
        return got  # type: ignore[return-value]


def _published_state(
    assignment: dict, by_service: dict[tuple[str, str], list[dict]], underlay: str
) -> LBState:
    """The host's published ports: ingress mode on every node, to every live task;
    host mode only to this node's own tasks (none here: nothing is published)."""
    iid = assignment["ingress_network_id"]
    me = (assignment.get("node") or {}).get("id")
    out = []
    for s in assignment.get("services") or []:
        eps = sorted(by_service.get((s["id"], iid), []), key=_addr_key)
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
