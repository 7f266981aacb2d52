"""Task endpoints by gossip (issue 5): every node runs a ``NetDBNode`` on ADVERTISE:7946 and
the worker's ``EndpointSource`` reads the per-network tables instead of the manager's list.

- The node's name is its node id; its key ring comes from the managers (the ``gossip``
  record of the cluster: ``{"keys": [base64...], "primary": base64}``), in the join answer
  and in every assignment. A node that cannot decrypt never joins: its packets and streams
  are dropped (and counted) by everyone else's transport.
- Key rotation is the leader's (manager.rotate_gossip_key): it commits install, use, remove
  as three records; each assignment carries the current one and we apply it as a diff
  (install every listed key, use the primary, remove the others), then acknowledge its
  digest on our next assignment poll (``gossip_ack``) so the leader knows when every node
  has reached a step. Install comes before use everywhere, so nobody ever receives a packet
  under a key it does not hold: no partition.
- Publishing: for each running local task attachment on a network of the assignment we
  ``put(nid, task_id, msgpack({ip, mac, vtep, task, service, service_id}))`` (``task``:
  the task name, ``service``: the service name; ``service_id`` since issue 6, absent from
  older agents' entries), joining the network first; a network without local tasks is left
  (its table is dropped, and the others tombstone our entries when they see the leave).
  The ingress network is joined by every node, like Docker's ingress sandbox: the routing
  mesh of every node forwards to every task on it, so every node needs its table.
- Joining pulls the network's table at once (NetworkDB's join sync): a restarted agent's
  tables are full about one round trip after it meets the members, which is why nothing
  here falls back on the managers' endpoint list any more.
- ``remotes()`` returns the live entries of the networks we are in, other owners only. A
  failed member's entries disappear at once (NetworkDB hides them), so when a host dies its
  endpoints leave every other node's FDB and neighbour tables without any manager.
- ``task_endpoints()`` returns the same entries with their names, for DNS and the load
  balancers (swarmnet/services_hook.py), which ``add_listener`` tells of every change.
- Every table event (ours excluded) asks the worker for one resync; the worker coalesces.

What stays on the manager: its ``endpoints`` list in the assignment is no longer read for
the overlay, nor by DNS/LB for the networks whose tables we hold; service definitions
(names, VIPs, modes, ports) still come from the assignment.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hashlib
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass

import msgpack

from swarmnet.gossip.config import GossipConfig
from swarmnet.gossip.core import MemberEvent
from swarmnet.gossip.keyring import Keyring, KeyringError
from swarmnet.gossip.netdb import NetDBConfig, NetDBError, TableEvent
from swarmnet.gossip.netdb_driver import NetDBNode
from swarmnet.overlay.plan import RemoteEndpoint, mac_for_ip

log = logging.getLogger(__name__)

GOSSIP_PORT = 7946


@dataclass(frozen=True)
class GossipAgentConfig:
    port: int = GOSSIP_PORT
    """Docker's gossip port (tcp+udp), on the node's advertise address."""

    join_retry_min_s: float = 1.0
    """A known peer (from the managers' list) that we do not see as a member is joined again
    after this long, doubling per failure..."""

    join_retry_max_s: float = 30.0
    """...up to this: a dead node costs one refused connection every 30 s."""

    leave_timeout_s: float = 3.0
    """``swarm leave``: how long the graceful gossip leave may take before we just stop."""


def decode_key(b64: str) -> bytes:
    try:
        key = base64.b64decode(b64, validate=True)
    except (binascii.Error, ValueError, TypeError) as e:
        raise KeyringError(f"gossip key is not base64: {e}") from None
    if len(key) not in (16, 24, 32):
        raise KeyringError("gossip key must be 16, 24 or 32 bytes")
    return key


def keyring_digest(record: dict) -> str:
    """What a node acknowledges: the same for the same keys and primary, whatever the order."""
    h = hashlib.sha256(str(record.get("primary", "")).encode())
    for k in sorted(record.get("keys") or []):
        h.update(b"," + str(k).encode())
    return h.hexdigest()[:16]


def _addr(s: str) -> tuple[str, int] | None:
    host, _, port = str(s).rpartition(":")
    try:
        return (host, int(port)) if host else None
    except ValueError:
        return None


class GossipEndpoints:
    """The agent's gossip component and the worker's ``EndpointSource``."""

    def __init__(
        self,
        node_id: str,
        advertise: str,
        *,
        keys: dict | None = None,
        on_keys: Callable[[dict], None] | None = None,
        request_sync: Callable[[], None] | None = None,
        config: GossipAgentConfig | None = None,
        gossip_config: GossipConfig | None = None,
        netdb_config: NetDBConfig | None = None,
        seeds: list[str] = (),  # type: ignore[assignment]
    ):
        self.node_id = node_id
        self.advertise = advertise
        self.config = config or GossipAgentConfig()
        self.gossip_config = gossip_config
        self.netdb_config = netdb_config
        self.keys = dict(keys) if keys else None  # the record last applied
        self.on_keys = on_keys
        self.request_sync = request_sync
        self.node: NetDBNode | None = None
        self.gossip_ack = ""  # digest of the key record in force, sent on the next poll
        # Until the first assignment names the peers: the managers' hosts (after a restart
        # while no manager answers, the pool is still found).
        self._peers: set[tuple[str, int]] = {(h, self.config.port) for h in seeds} - {
            (advertise, self.config.port)
        }
        self._retry: dict[tuple[str, int], tuple[float, float]] = {}  # addr -> (next, delay)
        self._published: dict[tuple[str, str], bytes] = {}
        self._desired: dict[tuple[str, str], bytes] = {}
        # Local tasks whose process the supervisor last reported not running (failed and
        # waiting for a restart, starting, stopped): not published, see task_state().
        self._down: set[str] = set()
        # remote entry -> (seen at, event number): what programmed() may log once done.
        self._unprogrammed: dict[tuple[str, str], tuple[float, int]] = {}
        self._events = 0  # table events counted so far
        self.read_seq = 0  # the event count when remotes() last read the tables
        self._seen_remote: set[tuple[str, str]] = set()
        self._start_task: asyncio.Task | None = None
        self._join_task: asyncio.Task | None = None
        self._closed = False
        # Told of every table change of another node's entry (services_hook: DNS and LB).
        self._listeners: list[Callable[[TableEvent], None]] = []
        self._ingress: str | None = None  # the assignment's ingress network, joined always

    # ---- lifecycle --------------------------------------------------------------------

    async def start(self) -> None:
        """Start at once if we hold a key record (join answer, or node.json after a
        restart); otherwise on the first assignment that carries one."""
        if self.keys:
            await self._start_node(self.keys)

    async def _start_node(self, record: dict) -> None:
        if self.node is not None or self._closed:
            return
        ring = self._keyring(record)
        node = NetDBNode(
            self.node_id,
            (self.advertise, self.config.port),
            advertise=(self.advertise, self.config.port),
            config=self.gossip_config,
            keyring=ring,
            rng=random.Random(),
            on_event=self._on_member,
            netdb_config=self.netdb_config,
            on_table_event=self._on_table,
        )
        try:
            await node.start()
        except OSError as e:
            # Port taken (another agent on this address) or address gone: the overlay then
            # has no remote endpoints; say so loudly rather than crash the agent.
            log.error("gossip: cannot listen on %s:%d: %s", self.advertise, self.config.port, e)
            return
        self.node = node
        self.gossip_ack = keyring_digest(record)
        log.info("gossip: node %s listening on %s:%d", self.node_id, *node.address)
        self._apply_publish()
        self._join_task = asyncio.create_task(self._join_loop(), name="gossip-join")

    async def close(self, leave: bool = False) -> None:
        self._closed = True
        for t in (self._start_task, self._join_task):
            if t is not None:
                t.cancel()
                with contextlib.suppress(BaseException):
                    await t
        node, self.node = self.node, None
        if node is None:
            return
        if leave:
            with contextlib.suppress(Exception):
                await node.leave(self.config.leave_timeout_s, propagate_s=0.2)
        await node.close()

    # ---- keys and peers from the managers --------------------------------------------

    @staticmethod
    def _keyring(record: dict) -> Keyring:
        keys = [decode_key(k) for k in record.get("keys") or []]
        primary = decode_key(record["primary"])
        return Keyring(keys, primary)

    def on_assignment(self, assignment: dict) -> None:
        """Called by the worker with every assignment: keys, then peers."""
        info = assignment.get("gossip")
        if not isinstance(info, dict):
            return
        peers = {a for a in (_addr(p) for p in info.get("peers") or []) if a is not None}
        me = (self.advertise, self.config.port)
        self._peers = peers - {me}
        record = {"keys": list(info.get("keys") or []), "primary": info.get("primary")}
        if not record["primary"]:
            return
        try:
            self._apply_keys(record)
        except KeyringError as e:
            log.error("gossip: the managers' key record is unusable: %s", e)

    def _apply_keys(self, record: dict) -> None:
        digest = keyring_digest(record)
        changed = self.keys is None or keyring_digest(self.keys) != digest
        if self.node is None:
            self.keys = record
            if self._start_task is None and not self._closed:
                self._start_task = asyncio.create_task(self._start_node(record))
        elif changed:
            # Install all, use the primary, then remove what is no longer listed: the same
            # order as the leader's phases, so any one step is safe on its own.
            want = [decode_key(k) for k in record["keys"]]
            primary = decode_key(record["primary"])
            for k in [*want, primary]:
                self.node.install_key(k)
            self.node.use_key(primary)
            for k in self.node.keyring.keys:
                if k not in want and k != primary:
                    self.node.remove_key(k)
            self.keys = record
            self.gossip_ack = digest
            log.info("gossip: key ring now %d key(s), digest %s", len(want), digest)
        if changed and self.on_keys is not None:
            self.on_keys(record)

    async def _join_loop(self) -> None:
        """Join the peers the managers know and we do not see (at start: all of them)."""
        while True:
            node = self.node
            if node is not None:
                now = time.monotonic()
                seen = {m.address for m in node.members()}
                due = [
                    a
                    for a in self._peers
                    if a not in seen and self._retry.get(a, (0.0, 0.0))[0] <= now
                ]
                if due:
                    results = await asyncio.gather(*(self._join_one(node, a) for a in due))
                    now = time.monotonic()
                    for a, ok in zip(due, results, strict=True):
                        cfg = self.config
                        if ok:
                            self._retry.pop(a, None)
                        else:
                            delay = min(
                                max(self._retry.get(a, (0.0, 0.0))[1] * 2, cfg.join_retry_min_s),
                                cfg.join_retry_max_s,
                            )
                            self._retry[a] = (now + delay, delay)
            await asyncio.sleep(0.5)

    async def _join_one(self, node: NetDBNode, addr: tuple[str, int]) -> bool:
        try:
            return await node.join([addr]) > 0
        except Exception as e:  # noqa: BLE001 - a peer's failure is never ours
            log.debug("gossip: join %s failed: %s", addr, e)
            return False

    # ---- events ------------------------------------------------------------------------

    def _on_member(self, ev: MemberEvent) -> None:
        event = {"join": "member-join", "leave": "member-leave", "failed": "member-failed"}
        if ev.kind in event:
            # A wall-clock stamp: the lab benchmark compares it across hosts' logs.
            log.info(
                "gossip: %s %s %s t=%.6f",
                event[ev.kind],
                ev.name,
                f"{ev.addr[0]}:{ev.addr[1]}" if ev.addr else "-",
                time.time(),
            )

    def _on_table(self, ev: TableEvent) -> None:
        if ev.owner == self.node_id:
            return
        k = (ev.nid, ev.key)
        if ev.kind == "delete":
            self._unprogrammed.pop(k, None)
            self._seen_remote.discard(k)
        else:
            self._events += 1
            self._unprogrammed.setdefault(k, (time.time(), self._events))
        if self.request_sync is not None:
            self.request_sync()
        self._notify(ev)

    def _notify(self, ev: TableEvent) -> None:
        for cb in list(self._listeners):
            try:
                cb(ev)
            except Exception:  # a consumer's bug must not stop the others or the pump
                log.exception("gossip: table listener failed")

    def add_listener(self, cb: Callable[[TableEvent], None]) -> None:
        """``cb(event)`` on every change of another node's entry, on the loop, from inside
        the gossip pump: it must not block (coalesce and do the work later)."""
        if cb not in self._listeners:
            self._listeners.append(cb)

    def remove_listener(self, cb: Callable[[TableEvent], None]) -> None:
        with contextlib.suppress(ValueError):
            self._listeners.remove(cb)

    # ---- the worker's EndpointSource ---------------------------------------------------

    def remotes(self, assignment: dict) -> list[RemoteEndpoint]:
        """Publish our local endpoints, then return the others' in our networks."""
        nets = assignment.get("networks") or {}
        iid = assignment.get("ingress_network_id")
        self._ingress = iid if iid in nets else None
        desired: dict[tuple[str, str], bytes] = {}
        for t in assignment.get("tasks") or []:
            if t.get("desired_state") != "running" or not t.get("spec"):
                continue
            for a in t.get("networks") or []:
                nid = a.get("network_id")
                if nid not in nets:
                    continue
                ip = str(a["address"]).split("/")[0]
                value = {
                    "ip": ip,
                    "mac": mac_for_ip(ip),
                    "vtep": self.advertise,
                    "task": t.get("name", ""),
                    "service": t.get("service_name", ""),
                    "service_id": t.get("service_id", ""),
                }
                desired[(nid, t["id"])] = msgpack.packb(value, use_bin_type=True)
        self._desired = desired
        self._down &= {k[1] for k in desired}  # forget tasks that are gone
        self._apply_publish()
        self.read_seq = self._events
        node = self.node
        if node is None:
            return []  # no gossip yet (no key ring): no remote endpoint is known
        return [
            RemoteEndpoint(network_id=nid, ip=ep["address"], vtep=ep["vtep"])
            for nid, ep in self._remote_entries(nets)
        ]

    def _remote_entries(self, nets: dict) -> list[tuple[str, dict]]:
        """Other owners' live entries in the networks we are in (and ``nets`` lists),
        decoded: ``(nid, {task_id, address, vtep, node_id, task_name, service_name,
        service_id})``; ``service_id`` is "" in entries of agents older than issue 6."""
        node = self.node
        if node is None:
            return []
        out = []
        for nid in sorted(node.networks()):
            if nid not in nets:
                continue
            for key, (owner, raw) in sorted(node.entries(nid).items()):
                if owner == self.node_id:
                    continue
                try:
                    v = msgpack.unpackb(raw, raw=False)
                    ep = {
                        "task_id": key,
                        "address": str(v["ip"]),
                        "vtep": str(v["vtep"]),
                        "node_id": owner,
                        "task_name": str(v.get("task") or ""),
                        "service_name": str(v.get("service") or ""),
                        "service_id": str(v.get("service_id") or ""),
                    }
                except (ValueError, TypeError, KeyError, AttributeError, msgpack.ExtraData):
                    log.warning("gossip: undecodable endpoint %s/%s from %s", nid, key, owner)
                    continue
                out.append((nid, ep))
        return out

    def joined_networks(self) -> set[str]:
        """The networks whose tables we hold (empty before the gossip node runs)."""
        return self.node.networks() if self.node is not None else set()

    def task_endpoints(self, assignment: dict) -> list[dict]:
        """Other nodes' task endpoints in the networks whose tables we hold, in the shape
        of the managers' ``endpoints`` list: ``{network_id, task_id, address, vtep,
        node_id, task_name, service_name, service_id}``. Our own tasks are not in it (the
        caller has them from the assignment)."""
        nets = assignment.get("networks") or {}
        return [{"network_id": nid, **ep} for nid, ep in self._remote_entries(nets)]

    def programmed(self, upto: int | None = None, at: float | None = None) -> None:
        """The worker reconciled the kernel with a ``remotes()`` read: log (with wall-clock
        stamps, for bench/gossip_lab.py) the remote entries now programmed. ``upto`` is the
        ``read_seq`` of that read: entries whose event came later are not in the kernel yet
        and stay pending (None: all of them). ``at``: when the kernel thread finished (wall
        clock); None: now. The loop may reach this call tens of ms after the fact, and
        that wait is not propagation."""
        if not self._unprogrammed:
            return
        done = time.time() if at is None else at
        for (nid, key), (seen, seq) in sorted(self._unprogrammed.items()):
            if upto is not None and seq > upto:
                continue
            del self._unprogrammed[(nid, key)]
            if (nid, key) in self._seen_remote:
                continue
            self._seen_remote.add((nid, key))
            log.info("gossip: programmed endpoint %s/%s seen=%.6f done=%.6f", nid, key, seen, done)

    def task_state(self, task_id: str, state: str) -> None:
        """The supervisor saw a local task change state. A task whose process is not running
        (it exited and waits for its restart, failed, or was shut down) is withdrawn from
        the tables now, so every node's DNS, load balancers and FDB drop it within one
        propagation round, with no manager in the path; it is published again when it runs.
        Tasks never reported (adopted after an agent restart) count as running.

        "starting" changes nothing: a task that exited stays withdrawn until it runs again,
        and a new task, published with the assignment that created it, stays published
        while its process starts (like Docker, whose endpoint exists before the container
        runs). Withdrawing it there made every new task flap (published, deleted ~100 ms
        later, published again) on every node's FDB, DNS and LBs, and cost two more
        gossip broadcasts per task."""
        if state == "starting":
            return
        down = state != "running"
        if down == (task_id in self._down):
            return
        if down:
            self._down.add(task_id)
        else:
            self._down.discard(task_id)
        self._apply_publish()
        # Our own sandboxes' DNS and LBs list our own tasks too: tell the consumers.
        for nid, key in self._desired:
            if key == task_id:
                self._notify(TableEvent("delete" if down else "add", nid, key, b"", self.node_id))

    def down_tasks(self) -> frozenset[str]:
        """Local tasks withdrawn by task_state (not running now)."""
        return frozenset(self._down)

    def _apply_publish(self) -> None:
        node = self.node
        if node is None:
            return
        # A network stays joined while a task of ours is on it, running or not: leaving
        # would drop its table and every peer's view of our other entries there.
        want_nets = {nid for nid, _ in self._desired}
        if self._ingress is not None:
            want_nets.add(self._ingress)
        for nid in sorted(want_nets - node.networks()):
            node.join_network(nid)
        publish = {k: v for k, v in self._desired.items() if k[1] not in self._down}
        for k, value in sorted(publish.items()):
            if self._published.get(k) == value:
                continue
            try:
                node.put(k[0], k[1], value)
            except NetDBError as e:
                log.error("gossip: cannot publish %s/%s: %s", k[0], k[1], e)
                continue
            self._published[k] = value
            log.info("gossip: published endpoint %s/%s t=%.6f", k[0], k[1], time.time())
        for k in sorted(set(self._published) - set(publish)):
            if k[0] in want_nets:
                node.delete(k[0], k[1])
            del self._published[k]
        for nid in sorted(node.networks() - want_nets):
            node.leave_network(nid)  # the others tombstone what we had in it

    def metrics(self) -> dict[str, int]:
        return self.node.metrics() if self.node is not None else {}


__all__ = ["GOSSIP_PORT", "GossipAgentConfig", "GossipEndpoints", "decode_key", "keyring_digest"]
