"""Timing and size settings of the gossip layer, in one place (DESIGN principle 4).

The LAN profile starts from hashicorp/memberlist's ``DefaultLANConfig`` (``config.go``), the
values a Debian ``serf`` agent runs with, so that our figures compare like with like and a
mixed pool (our nodes and serf's) agrees on how long suspicion lasts. ``wan()`` and
``local()`` override only what memberlist's own ``DefaultWANConfig``/``DefaultLocalConfig``
change. Derived values (suspicion bounds, retransmit limit, push-pull scaling) are functions
here so that the formulas live beside the numbers they use.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace


class ConfigError(ValueError):
    """A gossip setting, or a combination of settings, that cannot work."""


@dataclass(frozen=True)
class GossipConfig:
    """Every duration is in seconds (``_s``), every size in bytes (``_bytes``)."""

    bind_port: int = 7946
    """UDP and TCP port. 7946 is memberlist's and Docker's gossip port (DESIGN "Ports")."""

    probe_interval_s: float = 1.0
    """Time between two failure-detector probes (one member each, round robin). memberlist
    LAN: 1 s. Scaled by our health score: ``probe_interval_s * (health + 1)`` (Lifeguard), so a
    node that is itself slow probes less and blames others less."""

    probe_timeout_s: float = 0.5
    """How long to wait for the direct ack before asking ``indirect_checks`` peers to probe.
    memberlist LAN: 500 ms, "tuned to the 99th percentile RTT" of a LAN. Not scaled by health:
    waiting longer does not help UDP get through; the scaled interval gives indirect probes
    more time instead. Must be below ``probe_interval_s``."""

    indirect_checks: int = 3
    """Peers asked to probe a member that missed its direct ack (SWIM's k). memberlist LAN: 3.
    More peers means fewer false suspicions from one bad path, at k packets per miss."""

    suspicion_mult: int = 4
    """Suspicion timeout multiplier: min = suspicion_mult * max(1, log10(max(1, n))) *
    probe_interval_s. memberlist LAN: 4 (4 s below 10 nodes, 12 s at 1,000). It also sets
    Lifeguard's wanted confirmations k = suspicion_mult - 2."""

    suspicion_max_timeout_mult: int = 6
    """max suspicion timeout = this * min. memberlist LAN: 6. A suspicion starts at max and
    shrinks towards min as independent peers confirm it (Lifeguard), so a lone accuser with a
    bad link waits long enough for the accused to refute."""

    retransmit_mult: int = 4
    """Each broadcast is sent retransmit_mult * ceil(log10(n + 1)) times (4 below 10 nodes,
    16 at 1,000). memberlist LAN: 4, enough for an epidemic to reach everyone with high
    probability."""

    gossip_interval_s: float = 0.2
    """Time between gossip rounds, each sending queued broadcasts to ``gossip_nodes`` random
    members. memberlist LAN: 200 ms; with fan-out 3, about log3(n) rounds reach everyone."""

    gossip_nodes: int = 3
    """Fan-out of one gossip round. memberlist LAN: 3."""

    gossip_to_the_dead_s: float = 30.0
    """Keep gossiping to a dead member this long (so it can learn it was declared dead and
    refute), and keep its tombstone at least this long before forgetting it. memberlist LAN:
    30 s."""

    push_pull_interval_s: float = 30.0
    """Full state exchange (TCP) with one random member, the anti-entropy that repairs what
    gossip missed. memberlist LAN: 30 s; scaled up beyond 32 nodes (``push_pull_scale``) so
    that the cluster-wide TCP load stays bounded. 0 disables it."""

    tcp_fallback_ping: bool = True
    """When a direct UDP ping gets no ack, also ping the member over TCP (in parallel with the
    indirect pings, until the probe's deadline), as memberlist does unless DisableTcpPings.
    TCP retransmits, so random UDP loss alone no longer looks like a death: without it, 10%
    loss made our simulator suspect about one probe in 130."""

    reconnect_interval_s: float = 30.0
    """How often to try a join push-pull with one member we declared failed (not left), with
    probability failed/alive as Serf does (``ReconnectInterval`` 30 s). memberlist alone never
    talks to a dead member again once its tombstone is reaped, so a healed partition would
    stay split; Serf's reconnect is what merges it back. 0 disables it."""

    reconnect_timeout_s: float = 86400.0
    """Give up reconnecting to a failed member after this long (Serf ``ReconnectTimeout``,
    24 h)."""

    stream_timeout_s: float = 10.0
    """Whole-connection deadline of one TCP exchange (push-pull, TCP ping), for the driver.
    memberlist LAN ``TCPTimeout``: 10 s (WAN 30 s, local 1 s)."""

    awareness_max_multiplier: int = 8
    """Health score range is 0 .. this - 1; timeouts scale by (score + 1), at most 8x.
    memberlist LAN: 8."""

    packet_bytes_max: int = 1400
    """UDP payload budget for one datagram (memberlist ``UDPBufferSize``): below a 1500-byte
    Ethernet MTU minus IP/UDP headers and a VXLAN or VPN layer, so no fragmentation."""

    packet_reserved_bytes: int = 34
    """Bytes of each datagram kept free for what the driver adds after the core packs it:
    keyring encryption version 1 adds 29 (version byte, 12-byte nonce, 16-byte tag) and the
    CRC that peers with PMax >= 5 get adds 5. Reserving both always makes packing independent
    of the keyring and the peer's version, at 2.5% of the budget."""

    broadcast_queue_max: int = 4096
    """Most broadcasts kept queued; beyond it the oldest, most retransmitted go first. Serf's
    MaxQueueDepth is 4096; a queue this deep means gossip cannot keep up anyway."""

    pending_acks_max: int = 1024
    """Most outstanding ack handlers (our probes plus indirect probes we run for others).
    memberlist allows 128 concurrent push-pulls and no limit on acks; a bound keeps a flood of
    indirect-ping requests from growing memory without limit."""

    dead_node_reclaim_s: float = 0.0
    """A dead member's name may come back from another address after this long; 0 = never,
    which is what the serf agent sets (memberlist ``DeadNodeReclaimTime``)."""

    def validate(self) -> GossipConfig:
        """Raise ConfigError with a plain sentence for a setting that cannot work."""
        if not 0 < self.bind_port < 65536:
            raise ConfigError("bind port must be in 1..65535")
        if self.probe_interval_s <= 0 or self.probe_timeout_s <= 0:
            raise ConfigError("probe interval and probe timeout must be positive")
        if self.probe_timeout_s >= self.probe_interval_s:
            raise ConfigError("probe timeout must be < probe interval")
        if self.indirect_checks < 0:
            raise ConfigError("indirect checks must be >= 0")
        if self.suspicion_mult < 1:
            raise ConfigError("suspicion multiplier must be >= 1")
        if self.suspicion_max_timeout_mult < 1:
            raise ConfigError("suspicion max timeout multiplier must be >= 1")
        if self.retransmit_mult < 1:
            raise ConfigError("retransmit multiplier must be >= 1")
        if self.gossip_interval_s <= 0 or self.gossip_nodes < 1:
            raise ConfigError("gossip interval must be positive and gossip nodes >= 1")
        if self.push_pull_interval_s < 0 or self.gossip_to_the_dead_s < 0:
            raise ConfigError("push-pull interval and gossip-to-the-dead time must be >= 0")
        if self.reconnect_interval_s < 0 or self.reconnect_timeout_s < 0:
            raise ConfigError("reconnect interval and timeout must be >= 0")
        if self.stream_timeout_s <= 0:
            raise ConfigError("stream timeout must be positive")
        if self.awareness_max_multiplier < 1:
            raise ConfigError("awareness max multiplier must be >= 1")
        if self.packet_bytes_max - self.packet_reserved_bytes < 256:
            raise ConfigError("packet budget minus reserved bytes must leave >= 256 bytes")
        if self.broadcast_queue_max < 16 or self.pending_acks_max < 16:
            raise ConfigError("broadcast queue and pending acks limits must be >= 16")
        if self.dead_node_reclaim_s < 0:
            raise ConfigError("dead node reclaim time must be >= 0")
        return self

    @classmethod
    def lan(cls, **overrides: object) -> GossipConfig:
        """memberlist's DefaultLANConfig: a data centre, RTT well under 100 ms."""
        return replace(cls(), **overrides).validate()  # type: ignore[arg-type]

    @classmethod
    def wan(cls, **overrides: object) -> GossipConfig:
        """memberlist's DefaultWANConfig: slower, lossier paths between sites."""
        base = replace(
            cls(),
            probe_interval_s=5.0,
            probe_timeout_s=3.0,
            suspicion_mult=6,
            gossip_interval_s=0.5,
            gossip_nodes=4,
            gossip_to_the_dead_s=60.0,
            push_pull_interval_s=60.0,
            stream_timeout_s=30.0,
        )
        return replace(base, **overrides).validate()  # type: ignore[arg-type]

    @classmethod
    def local(cls, **overrides: object) -> GossipConfig:
        """memberlist's DefaultLocalConfig: loopback or one host, fast and reliable."""
        base = replace(
            cls(),
            probe_interval_s=1.0,
            probe_timeout_s=0.2,
            indirect_checks=1,
            suspicion_mult=3,
            gossip_interval_s=0.1,
            gossip_to_the_dead_s=15.0,
            push_pull_interval_s=15.0,
            retransmit_mult=2,
            stream_timeout_s=1.0,
        )
        return replace(base, **overrides).validate()  # type: ignore[arg-type]


def suspicion_timeout_s(suspicion_mult: int, n: int, probe_interval_s: float) -> float:
    """Lifeguard's minimum suspicion timeout: mult * max(1, log10(max(1, n))) * interval,
    rounded to milliseconds as memberlist does (``util.go suspicionTimeout``)."""
    node_scale = max(1.0, math.log10(max(1, n)))
    return round(suspicion_mult * node_scale * probe_interval_s * 1000.0) / 1000.0


def retransmit_limit(retransmit_mult: int, n: int) -> int:
    """How many times one broadcast is sent: mult * ceil(log10(n + 1)) (``util.go``)."""
    return retransmit_mult * math.ceil(math.log10(n + 1))


def push_pull_scale(interval_s: float, n: int) -> float:
    """Push-pull interval grows by ceil(log2(n) - log2(32)) + 1 beyond 32 nodes, so that
    cluster-wide full-state TCP traffic grows as n log n, not n^2 (``util.go pushPullScale``)."""
    if n <= 32:
        return interval_s
    multiplier = math.ceil(math.log2(n) - math.log2(32)) + 1
    return interval_s * multiplier
