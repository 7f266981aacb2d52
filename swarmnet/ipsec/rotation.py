"""The managers' key rotation as a pure state machine: events and ``now`` in, key sets out.

Make-before-break across the cluster, driven by acknowledgements rather than by timing:

    STEADY     keys {K}, primary K
      | due: age >= interval, a node's SA counter >= threshold, or forced
      v          (output GenerateKey; the driver answers with KeyGenerated)
    INSTALLING keys {K, N}, primary K  -- every node installs N inbound (and idle outbound)
      | every current node acknowledged this version (Applied)
      v
    SWITCHING  keys {K, N}, primary N  -- nodes switch their out policies to N
      | every node acknowledged AND now >= switched_at + grace (packets in flight, queues)
      v
    STEADY     keys {N}, primary N     -- K's SAs removed everywhere

Why this is safe: a node sends with N only after it applied a SWITCHING version, which is
published only when every node had applied a version containing N; a node removes K only
after it applied the final version, published only when every node had switched away from
K. Nodes apply versions in increasing order (older deliveries are ignored), and the per-node
``plan.diff`` adds before it switches and switches before it removes. The unit tests model-
check this over random delivery orders. A node that never acknowledges (dead, not yet
removed) stalls rotation — safe, and ``NodeLeft`` from membership unblocks it.

Packet-count trigger: the agent reads its SAs' counters (``ip -s xfrm state``: packets, and
the 64-bit ``oseq``) and reports the largest per key; ``threshold_packets`` defaults to 2^31,
half the 32-bit space, which is what matters if ESN is ever off (``EspConfig(esn=False)``:
``RotationConfig.validate`` refuses a threshold that leaves less than half the space).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from swarmnet.ipsec.keys import Key, KeySet

STEADY, INSTALLING, SWITCHING = "steady", "installing", "switching"


@dataclass(frozen=True)
class RotationConfig:
    interval_s: float = 12 * 3600.0  # Docker's period; configurable
    grace_s: float = 30.0  # after every node switched: in-flight packets and slow queues
    threshold_packets: int = 1 << 31

    def validate(self, esn: bool) -> None:
        if self.interval_s <= 0 or self.grace_s < 0 or self.threshold_packets <= 0:
            raise ValueError("interval > 0, grace >= 0 and threshold > 0 are required")
        if not esn and self.threshold_packets > 1 << 31:
            raise ValueError("without ESN the packet threshold must stay below 2^31")


# ---- events ----


@dataclass(frozen=True)
class Tick:
    """Time passes (the driver calls this periodically, e.g. every few seconds)."""


@dataclass(frozen=True)
class NodeJoined:
    node: str


@dataclass(frozen=True)
class NodeLeft:
    node: str


@dataclass(frozen=True)
class Applied:
    """``node`` programmed key-set ``version`` (or a later one) completely."""

    node: str
    version: int


@dataclass(frozen=True)
class Counters:
    """The most packets any SA of ``key_id`` on ``node`` has carried (its out oseq)."""

    node: str
    key_id: int
    packets: int


@dataclass(frozen=True)
class ForceRotate:
    """Operator request, or an SPI collision: rotate now (still make-before-break)."""


@dataclass(frozen=True)
class KeyGenerated:
    key: Key


Event = Tick | NodeJoined | NodeLeft | Applied | Counters | ForceRotate | KeyGenerated


# ---- outputs ----


@dataclass(frozen=True)
class Publish:
    """Store in Raft and push to every node over the mTLS channel."""

    keyset: KeySet


@dataclass(frozen=True)
class GenerateKey:
    key_id: int


Output = Publish | GenerateKey


@dataclass
class KeyRotation:
    keyset: KeySet
    cfg: RotationConfig = RotationConfig()
    nodes: set[str] = field(default_factory=set)
    acked: dict[str, int] = field(default_factory=dict)  # node -> highest version applied
    phase: str = STEADY
    phase_since: float = 0.0
    pending_key: bool = False  # GenerateKey emitted, KeyGenerated not yet seen
    reason: str = ""  # why the current rotation started (logs, metrics)

    @classmethod
    def bootstrap(cls, key: Key, now: float, cfg: RotationConfig = RotationConfig()):
        return cls(KeySet(1, (key,), key.key_id), cfg, phase_since=now)

    def _all_acked(self) -> bool:
        return all(self.acked.get(n, 0) >= self.keyset.version for n in self.nodes)

    def _publish(self, keys: tuple[Key, ...], primary: int, phase: str, now: float) -> Output:
        self.keyset = KeySet(self.keyset.version + 1, keys, primary)
        self.phase, self.phase_since = phase, now
        return Publish(self.keyset)

    def _due(self, reason: str) -> list[Output]:
        if self.phase != STEADY or self.pending_key:
            return []
        self.pending_key, self.reason = True, reason
        return [GenerateKey(max(self.keyset.ids) + 1)]

    def handle(self, ev: Event, now: float) -> list[Output]:
        out: list[Output] = []
        if isinstance(ev, NodeJoined):
            self.nodes.add(ev.node)
            self.acked.setdefault(ev.node, 0)
        elif isinstance(ev, NodeLeft):
            self.nodes.discard(ev.node)
            self.acked.pop(ev.node, None)
        elif isinstance(ev, Applied):
            if ev.node in self.nodes:
                self.acked[ev.node] = max(self.acked.get(ev.node, 0), ev.version)
        elif isinstance(ev, Counters):
            if ev.key_id == self.keyset.primary and ev.packets >= self.cfg.threshold_packets:
                out += self._due(f"packets {ev.packets} on {ev.node}")
        elif isinstance(ev, ForceRotate):
            out += self._due("forced")
        elif isinstance(ev, KeyGenerated):
            if self.pending_key and self.phase == STEADY and ev.key.key_id not in self.keyset.ids:
                self.pending_key = False
                cur = self.keyset.primary_key
                out.append(self._publish((cur, ev.key), cur.key_id, INSTALLING, now))
        if self.phase == STEADY and now - self.keyset.primary_key.created_at >= self.cfg.interval_s:
            out += self._due("interval")
        return out + self._advance(now)

    def _advance(self, now: float) -> list[Output]:
        if not self._all_acked():
            return []
        if self.phase == INSTALLING:
            new = max(self.keyset.keys, key=lambda k: k.key_id)
            return [self._publish(self.keyset.keys, new.key_id, SWITCHING, now)]
        if self.phase == SWITCHING and now >= self.phase_since + self.cfg.grace_s:
            return [self._publish((self.keyset.primary_key,), self.keyset.primary, STEADY, now)]
        return []


@dataclass
class NodeKeys:
    """A node's side: the newest key set it was given, and which one it has applied.
    Versions only move forward, so a late delivery of an old set is ignored."""

    received: KeySet | None = None
    applied: int = 0

    def offer(self, ks: KeySet) -> bool:
        """True if ``ks`` is newer than what we have (then plan + apply it, then ``done``)."""
        if self.received is not None and ks.version <= self.received.version:
            return False
        self.received = ks
        return True

    def done(self, node: str, version: int) -> Applied | None:
        """The set ``version`` is fully programmed: the acknowledgement to send, if new."""
        if version <= self.applied:
            return None
        self.applied = version
        return Applied(node, version)
