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
  ``put(nid, task_id, msgpack({ip, mac, vtep, task, service}))``, joining the network
  first; a network without local tasks is left (its table is dropped, and the others
  tombstone our entries when they see the leave).
- ``remotes()`` returns the live entries of the networks we are in, other owners only. A
  failed member's entries disappear at once (NetworkDB hides them), so when a host dies its
  endpoints leave every other node's FDB and neighbour tables without any manager.
- Every table event (ours excluded) asks the worker for one resync; the worker coalesces.

What stays on the manager: its ``endpoints`` list in the assignment is no longer read for the
overlay; DNS/LB still read service and task names from it (to be moved to gossip later).
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
from swarmnet.gossip.messages import NodeState
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


WARMUP_S = 35.0
"""How long after the gossip node starts the managers' endpoint list is merged in: longer than
NetworkDB's periodic bulk sync (30 s), which is what refills a restarted node's tables when no
peer sees it rejoin; bounded so that a stale manager view cannot keep a dead endpoint long."""


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
        # remote entry -> (seen at, event number): what programmed() may log once done.
        self._unprogrammed: dict[tuple[str, str], tuple[float, int]] = {}
        self._events = 0  # table events counted so far
        self.read_seq = 0  # the event count when remotes() last read the tables
        self._seen_remote: set[tuple[str, str]] = set()
        self._start_task: asyncio.Task | None = None
        self._join_task: asyncio.Task | None = None
        self._closed = False
        self._warm_until = 0.0  # set when the gossip node starts; see WARMUP_S

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
        self._warm_until = time.monotonic() + WARMUP_S
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

    # ---- the worker's EndpointSource ---------------------------------------------------

    def remotes(self, assignment: dict) -> list[RemoteEndpoint]:
        """Publish our local endpoints, then return the others' in our networks."""
        nets = assignment.get("networks") or {}
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
                }
                desired[(nid, t["id"])] = msgpack.packb(value, use_bin_type=True)
        self._desired = desired
        self._apply_publish()
        self.read_seq = self._events
        node = self.node
        if node is None:
            return self._manager_view(assignment)
        out = []
        for nid in sorted(node.networks()):
            if nid not in nets:
                continue
            for _key, (owner, raw) in sorted(node.entries(nid).items()):
                if owner == self.node_id:
                    continue
                try:
                    v = msgpack.unpackb(raw, raw=False)
                    out.append(RemoteEndpoint(network_id=nid, ip=str(v["ip"]), vtep=str(v["vtep"])))
                except (ValueError, TypeError, KeyError, msgpack.ExtraData):
                    log.warning("gossip: undecodable endpoint %s/%s from %s", nid, _key, owner)
        if time.monotonic() < self._warm_until:
            # A (re)started node's tables are empty until its first bulk sync, and the
            # periodic one comes only every 30 s: programming from them alone would delete
            # every remote FDB/neighbour entry the kernel still has and cut live traffic (an
            # agent restart must not disturb it). Until then also keep what the managers list.
            # Never for a node gossip itself has seen die or leave: that news is fresher
            # than any manager's list (and the managers may be the ones unreachable).
            gone = {
                m.address[0]
                for m in node.members(include_dead=True)
                if m.state in (NodeState.DEAD, NodeState.LEFT)
            }
            seen = {(r.network_id, r.ip) for r in out}
            out += [
                r
                for r in self._manager_view(assignment)
                if (r.network_id, r.ip) not in seen and r.vtep not in gone
            ]
        return out

    @staticmethod
    def _manager_view(assignment: dict) -> list[RemoteEndpoint]:
        return [
            RemoteEndpoint(network_id=e["network_id"], ip=e["address"].split("/")[0], vtep=e["vtep"])
            for e in assignment.get("endpoints") or []
        ]

    def programmed(self, upto: int | None = None) -> None:
        """The worker reconciled the kernel with a ``remotes()`` read: log (with wall-clock
        stamps, for bench/gossip_lab.py) the remote entries now programmed. ``upto`` is the
        ``read_seq`` of that read: entries whose event came later are not in the kernel yet
        and stay pending (None: all of them)."""
        if not self._unprogrammed:
            return
        done = time.time()
        for (nid, key), (seen, seq) in sorted(self._unprogrammed.items()):
            if upto is not None and seq > upto:
                continue
            del self._unprogrammed[(nid, key)]
            if (nid, key) in self._seen_remote:
                continue
            self._seen_remote.add((nid, key))
            log.info("gossip: programmed endpoint %s/%s seen=%.6f done=%.6f", nid, key, seen, done)

    def _apply_publish(self) -> None:
        node = self.node
        if node is None:
            return
        want_nets = {nid for nid, _ in self._desired}
        for nid in sorted(want_nets - node.networks()):
            node.join_network(nid)
        for k, value in sorted(self._desired.items()):
            if self._published.get(k) == value:
                continue
            try:
                node.put(k[0], k[1], value)
            except NetDBError as e:
                log.error("gossip: cannot publish %s/%s: %s", k[0], k[1], e)
                continue
            self._published[k] = value
            log.info("gossip: published endpoint %s/%s t=%.6f", k[0], k[1], time.time())
        for k in sorted(set(self._published) - set(self._desired)):
            if k[0] in want_nets:
                node.delete(k[0], k[1])
            del self._published[k]
        for nid in sorted(node.networks() - want_nets):
            node.leave_network(nid)  # the others tombstone what we had in it

    def metrics(self) -> dict[str, int]:
        return self.node.metrics() if self.node is not None else {}


__all__ = ["GOSSIP_PORT", "GossipAgentConfig", "GossipEndpoints", "decode_key", "keyring_digest"]
