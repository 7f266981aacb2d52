"""The managers' side of encrypted overlays: what a node's assignment carries, the node's
reports, and the leader's rotation driver.

Where things live (docs/encryption.md):
- The key schedule is in the Raft store (``ClusterState.ipsec()``: key set, rotation phase,
  a pending operator request), written only by the leader with compare-and-set commands
  (``ipsec_keys``), so a deposed leader cannot overwrite a newer set.
- A node's facts (``esp``: can its kernel do ESP; ``epoch``: its sender epoch, keys.py;
  ``applied``: the newest key-set version it programmed) are in its node record
  (``ipsec_node``), reported over the mutual-TLS node channel (``POST /cluster/ipsec``).
  Keeping ``applied`` in Raft rather than in the leader's memory lets a new leader continue
  a rotation where the old one stopped.
- Key sets go to nodes only inside their assignment (``GET /cluster/assignments``, TLS with
  a verified node certificate), and only to the nodes that take part in an encrypted
  network (``raft.state.ipsec_participants``). Never through gossip.
- SA packet counters stay in the leader's memory (re-reported every ~30 s): they only
  trigger a rotation, and a lost one is reported again.

The rotation itself is ``rotation.KeyRotation``, rebuilt from the store on every pass (it is
a small value) and fed Tick, ForceRotate, Counters and KeyGenerated; NodeJoined/NodeLeft are
implicit in the participant set, which follows membership and task placement.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from swarmnet.ipsec.keys import KeySet, generate_key
from swarmnet.ipsec.rotation import (
    STEADY,
    Counters,
    ForceRotate,
    GenerateKey,
    KeyGenerated,
    KeyRotation,
    Output,
    RotationConfig,
    Tick,
)
from swarmnet.raft.state import ClusterState, ipsec_participants

log = logging.getLogger(__name__)


def ipsec_assignment(state: ClusterState, node_id: str) -> dict | None:
    """The ``ipsec`` part of a node's assignment, None unless the node takes part in an
    encrypted network: ``keyset`` (KeySet.to_dict() or None before the leader made one),
    ``epochs`` (VTEP -> sender epoch of every participant, this node included) and
    ``networks`` (the encrypted networks this node is on)."""
    parts = ipsec_participants(state)
    if node_id not in parts:
        return None
    epochs = {}
    for nid in parts:
        n = state.nodes[nid]
        epochs[n["addr"]] = int((n.get("ipsec") or {}).get("epoch", 0))
    return {
        "keyset": state.ipsec().get("keyset"),
        "epochs": epochs,
        "networks": sorted(parts[node_id]),
    }


def parse_report(body: Any) -> tuple[dict, dict[int, int]]:
    """``POST /cluster/ipsec`` {esp: bool, epoch: int, applied: int, counters: {key_id:
    packets}} -> (fields for ``ipsec_node``, counters). Unknown or ill-typed fields are
    dropped: a report can never write anything but these three facts."""
    if not isinstance(body, dict):
        raise ValueError("the body must be a JSON object")
    facts: dict = {}
    if isinstance(body.get("esp"), bool):
        facts["esp"] = body["esp"]
    for k in ("epoch", "applied"):
        v = body.get(k)
        if isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 1 << 63:
            facts[k] = v
    counters: dict[int, int] = {}
    raw = body.get("counters")
    if isinstance(raw, dict):
        for k, v in raw.items():
            if str(k).isdigit() and isinstance(v, int) and v >= 0:
                counters[int(k)] = v
    return facts, counters


def effective_config(defaults: RotationConfig | None, overrides: dict | None) -> RotationConfig:
    """The defaults with the operator's settings from the store on top (they are validated
    by the state machine, and again here: ESN is always on)."""
    d, o = defaults or RotationConfig(), overrides or {}
    cfg = RotationConfig(
        interval_s=float(o.get("interval_s", d.interval_s)),
        grace_s=float(o.get("grace_s", d.grace_s)),
        threshold_packets=int(o.get("threshold_packets", d.threshold_packets)),
    )
    cfg.validate(esn=True)
    return cfg


class IpsecDriver:
    """The leader's pass over the key schedule (``step``), and node reports (``report``)."""

    def __init__(self, cfg: RotationConfig | None = None, clock=time.time) -> None:
        self.cfg = cfg or RotationConfig()
        self.clock = clock  # wall clock: key ages survive leader changes
        self.counters: dict[str, dict[int, int]] = {}

    def config(self, overrides: dict | None = None) -> RotationConfig:
        return effective_config(self.cfg, overrides)

    async def report(self, store, node_id: str, body: Any) -> None:
        facts, counters = parse_report(body)
        if counters:
            self.counters[node_id] = counters
        if not facts:
            return
        cur = store.read(lambda s: dict((s.nodes.get(node_id) or {}).get("ipsec") or {}))
        if {**cur, **facts} != cur:  # a Raft write only when something changed
            await store.submit({"op": "ipsec_node", "node_id": node_id, **facts})

    async def step(self, store) -> None:
        """One leader pass: make the first key set once an encrypted network exists, then
        run the rotation and publish its next key set (compare-and-set)."""
        view = store.read(_view)
        if view is None:
            return
        sched, parts, acked, any_encrypted, overrides = view
        cfg = self.config(overrides)
        now = self.clock()
        if sched.get("keyset") is None:
            if not any_encrypted:
                return
            key = generate_key(1, now)
            ks = KeySet(1, (key,), key.key_id)
            await self._publish(store, ks, STEADY, now, 0, False)
            log.info("ipsec: first key set published")
            return
        old = KeySet.from_dict(sched["keyset"])
        for nid in list(self.counters):
            if nid not in parts:
                del self.counters[nid]
        rot = KeyRotation(
            old,
            cfg,
            nodes=set(parts),
            acked={n: acked.get(n, 0) for n in parts},
            phase=sched.get("phase", STEADY),
            phase_since=float(sched.get("since", 0.0)),
        )
        outs: list[Output] = []
        force = bool(sched.get("force"))
        if force:
            outs += rot.handle(ForceRotate(), now)
        for nid, per_key in sorted(self.counters.items()):
            for key_id, packets in sorted(per_key.items()):
                outs += rot.handle(Counters(nid, key_id, packets), now)
        outs += rot.handle(Tick(), now)
        while any(isinstance(o, GenerateKey) for o in outs):
            gen = next(o for o in outs if isinstance(o, GenerateKey))
            outs = [o for o in outs if o is not gen]
            outs += rot.handle(KeyGenerated(generate_key(gen.key_id, now)), now)
        if rot.keyset.version == old.version:
            return
        log.info(
            "ipsec: key set v%d (%s, primary key %d)%s",
            rot.keyset.version,
            rot.phase,
            rot.keyset.primary,
            f" ({rot.reason})" if rot.phase != STEADY and rot.reason else "",
        )
        await self._publish(store, rot.keyset, rot.phase, rot.phase_since, old.version, force)

    async def _publish(
        self, store, ks: KeySet, phase: str, since: float, expect: int, clear_force: bool
    ) -> None:
        cmd = {
            "op": "ipsec_keys",
            "keyset": ks.to_dict(),
            "phase": phase,
            "since": since,
            "expect_version": expect,
            "clear_force": clear_force,
        }
        result = await store.submit(cmd)
        if "error" in result:
            log.warning("ipsec: key set v%d refused: %s", ks.version, result["error"]["message"])


def _view(s: ClusterState):
    if s.cluster is None:
        return None
    parts = ipsec_participants(s)
    acked = {nid: int((s.nodes[nid].get("ipsec") or {}).get("applied", 0)) for nid in parts}
    any_encrypted = any(n.get("encrypted") for n in s.networks.values())
    return dict(s.ipsec()), parts, acked, any_encrypted, dict(s.cluster.get("ipsec_config") or {})


def ipsec_status(s: ClusterState, defaults: RotationConfig | None = None) -> dict:
    """What an operator may see of the key schedule: versions, key ids and ages, the phase,
    each node's progress, the effective rotation settings. Never key material."""
    sched = s.ipsec()
    ks = sched.get("keyset") or {}
    parts = ipsec_participants(s) if s.cluster is not None else {}
    overrides = dict((s.cluster or {}).get("ipsec_config") or {})
    cfg = effective_config(defaults, overrides)
    return {
        "version": int(ks.get("version", 0)),
        "primary": ks.get("primary"),
        "keys": [
            {"id": int(k["key_id"]), "created_at": float(k["created_at"])}
            for k in ks.get("keys") or []
        ],
        "phase": sched.get("phase", STEADY),
        "since": float(sched.get("since", 0.0)),
        "force": bool(sched.get("force")),
        "config": {
            "interval_s": cfg.interval_s,
            "grace_s": cfg.grace_s,
            "threshold_packets": cfg.threshold_packets,
        },
        "nodes": {
            nid: {
                "hostname": n.get("hostname", ""),
                "esp": (n.get("ipsec") or {}).get("esp"),
                "applied": int((n.get("ipsec") or {}).get("applied", 0)),
                "participant": nid in parts,
                "networks": sorted(parts.get(nid, ())),
            }
            for nid, n in sorted(s.nodes.items())
        },
    }
