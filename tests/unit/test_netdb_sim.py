"""NetworkDB on the real membership cores in the deterministic simulator: 50 nodes, 5
networks, 10% loss. Convergence, network scoping, failure and restart within the grace.

A failure prints ``reproduce: SWARMNET_SEED=<n>``."""

from __future__ import annotations

import random
from dataclasses import replace

from swarmnet.gossip.config import GossipConfig
from swarmnet.gossip.core import MemberEvent
from swarmnet.gossip.netdb import NetDBConfig, NetworkDB, TableEvent
from swarmnet.gossip.sim import SimNetwork, reproducible, seed_from_env


class NetDBSim(SimNetwork):
    """SimNetwork with a NetworkDB per node, wired as the worker's driver will be: membership
    events and user messages in; outbound as send_user (by name) or broadcast_user."""

    def __init__(self, seed: int, loss: float, netdb: NetDBConfig | None = None) -> None:
        super().__init__(seed, GossipConfig.lan(), loss=loss)
        self.netdb_config = netdb or NetDBConfig()
        self.dbs: dict[str, NetworkDB] = {}
        self.table_log: list[tuple[float, str, TableEvent]] = []
        self._db_armed: dict[str, float] = {}
        self.on_event = self._member_event

    def add(self, name: str, addr: str | None = None) -> None:
        self._down.discard(name)
        self.add_node(name, addr=addr)
        rng = random.Random(self.rng.getrandbits(64))
        self.dbs[name] = NetworkDB(name, rng, self.now, self.netdb_config)
        self._flush(name)

    def restart(self, name: str, via: str) -> None:
        """A new process with the same name and address: fresh core, fresh NetworkDB."""
        addr = self.cores[name].address[0]
        self._db_armed.pop(name, None)
        self.add(name, addr=addr)
        self.join(name, via)

    def _member_event(self, now: float, name: str, ev: MemberEvent) -> None:
        db = self.dbs.get(name)
        if db is None or name in self._down:
            return
        if ev.kind == "user":
            db.receive(self._by_addr.get(ev.addr, "") if ev.addr else "", ev.payload, now)
        else:
            db.on_member(ev.kind, ev.name, now)
        self._flush(name)

    def _flush(self, name: str) -> None:
        db, core = self.dbs[name], self.cores[name]
        out = db.take_outbound()
        for dest, payload in out:
            if dest is None:
                core.broadcast_user(payload)
            else:
                m = core._nodes.get(dest)
                if m is not None:
                    core.send_user(m.address, payload)
        for ev in db.take_events():
            self.table_log.append((self.now, name, ev))
        if out:
            self._after_input(name)
        deadline = db.next_deadline()
        if deadline is not None and name not in self._down:
            deadline = max(deadline, self.now)
            if self._db_armed.get(name) != deadline:
                self._db_armed[name] = deadline
                self._push(deadline, "db_timer", name)

    def _do_db_timer(self, name: str) -> None:
        if self._db_armed.get(name) != self.now or name in self._down:
            return
        del self._db_armed[name]
        self.dbs[name].handle_timer(self.now)
        self._flush(name)

    def api(self, name: str, fn: str, *args: object) -> None:
        getattr(self.dbs[name], fn)(*args, self.now)
        self._flush(name)


def build(seed: int, n: int, networks: int, loss: float) -> tuple[NetDBSim, dict[str, set[str]]]:
    sim = NetDBSim(seed, loss=loss)
    names = [f"node{i:02d}" for i in range(n)]
    for name in names:
        sim.add(name)
    sim.bootstrap_full_mesh()
    for name in names:
        for other in names:
            if other != name:
                sim.dbs[name].on_member("join", other, sim.now)
        sim._flush(name)
    pick = random.Random(seed)
    members: dict[str, set[str]] = {}
    for k in range(networks):
        nid = f"net{k}"
        members[nid] = set(pick.sample(names, pick.randint(n // 5, n // 2)))
        for name in sorted(members[nid]):
            sim.api(name, "join_network", nid)
    return sim, members


def converged(sim: NetDBSim, members: dict[str, set[str]], truth: dict[str, dict]) -> bool:
    for name in sim.up():
        db = sim.dbs[name]
        for nid, mem in members.items():
            if name in mem:
                if db.entries(nid) != truth[nid]:
                    return False
            elif nid in db.stored_networks() or db.entries(nid):
                return False
    return True


def test_fifty_nodes_five_networks_converge_under_loss_then_kill_and_restart() -> None:
    seed = seed_from_env(5)
    with reproducible(seed):
        sim, members = build(seed, 50, 5, loss=0.10)
        sim.run_for(5.0)
        ops = random.Random(seed + 1)
        truth: dict[str, dict[str, tuple[str, bytes]]] = {nid: {} for nid in members}
        owned: dict[str, list[tuple[str, str]]] = {}
        for i in range(300):
            nid = ops.choice(sorted(members))
            node = ops.choice(sorted(members[nid]))
            mine = [k for k, (o, _) in truth[nid].items() if o == node]
            if mine and ops.random() < 0.3:
                key = ops.choice(sorted(mine))
                sim.api(node, "delete", nid, key)
                del truth[nid][key]
            else:
                key = ops.choice(sorted(mine)) if mine and ops.random() < 0.3 else f"ep-{node}-{i}"
                value = f"{{ip: 10.0.{i % 256}.{i // 256}}}".encode()
                sim.api(node, "put", nid, key, value)
                truth[nid][key] = (node, value)
            sim.run_for(ops.random() * 0.1)
        ok = sim.run_until(
            sim.now + 120.0, stop=lambda: converged(sim, members, truth), check_every_s=1.0
        )
        assert ok, "no convergence within 120 s of virtual time at 10% loss"
        for nid, owners in truth.items():
            for key, (owner, _) in owners.items():
                owned.setdefault(owner, []).append((nid, key))

        # Kill the node owning the most entries: they leave every other node.
        victim = max(sorted(owned), key=lambda o: len(owned[o]))
        victim_keys = set(owned[victim])
        saved = {(nid, key): truth[nid][key] for nid, key in victim_keys}
        sim.kill(victim)
        t_kill = sim.now
        gone = {nid: {k: v for k, v in t.items() if v[0] != victim} for nid, t in truth.items()}
        ok = sim.run_until(
            sim.now + 120.0, stop=lambda: converged(sim, members, gone), check_every_s=0.5
        )
        assert ok, "a dead node's entries stayed visible"
        detection_s = sim.now - t_kill
        assert detection_s < 60.0, detection_s  # suspicion max at 50 nodes is about 41 s

        # Restart it within the grace: fresh process, same name; it re-puts the same entries.
        sim.run_for(10.0)
        mark = len(sim.table_log)
        sim.restart(victim, via=next(n for n in sim.up() if n != victim))
        for nid in sorted(members):
            if victim in members[nid]:
                sim.api(victim, "join_network", nid)
        for (nid, key), (_, value) in sorted(saved.items()):
            sim.api(victim, "put", nid, key, value)
        ok = sim.run_until(
            sim.now + 120.0, stop=lambda: converged(sim, members, truth), check_every_s=1.0
        )
        assert ok, "the restarted node's entries did not come back everywhere"
        sim.run_for(40.0)  # past a bulk sync round: nothing may flap afterwards
        assert converged(sim, members, truth)
        after = [(who, ev) for _, who, ev in sim.table_log[mark:] if who != victim]
        kinds: dict[tuple[str, str, str], list[str]] = {}
        for who, ev in after:
            kinds.setdefault((who, ev.nid, ev.key), []).append(ev.kind)
        assert all(k == ["add"] for k in kinds.values()), "churn after the restart"
        expected = sum(len(members[nid] - {victim}) for nid, _ in victim_keys)
        assert len(kinds) == expected


def test_restarted_node_refills_its_tables_without_the_periodic_sync() -> None:
    """A node restarts (fresh process, same name and address) before anyone noticed it died,
    joins its networks again and re-puts its entries. Then every periodic bulk sync is pushed
    out of reach (1 h), so only the join sync can refill it: its tables must equal everyone's
    within a few seconds of virtual time, at 5% loss (a lost answer is retried)."""
    seed = seed_from_env(11)
    with reproducible(seed):
        sim = NetDBSim(seed, loss=0.0)
        names = [f"node{i:02d}" for i in range(20)]
        for name in names:
            sim.add(name)
        sim.bootstrap_full_mesh()
        for name in names:
            for other in names:
                if other != name:
                    sim.dbs[name].on_member("join", other, sim.now)
            sim._flush(name)
        members = {"net0": set(names[:12]), "net1": set(names[6:]), "net2": set(names[::2])}
        for nid, mem in sorted(members.items()):
            for name in sorted(mem):
                sim.api(name, "join_network", nid)
        truth: dict[str, dict[str, tuple[str, bytes]]] = {nid: {} for nid in members}
        for nid, mem in sorted(members.items()):
            for name in sorted(mem):
                for k in range(3):
                    key, value = f"ep-{name}-{k}", f"{name}/{k}".encode()
                    sim.api(name, "put", nid, key, value)
                    truth[nid][key] = (name, value)
        ok = sim.run_until(
            sim.now + 120.0, stop=lambda: converged(sim, members, truth), check_every_s=0.5
        )
        assert ok, "no initial convergence"

        # From now on no periodic sync (the restarted node's config, and the others' timers).
        no_periodic = replace(sim.netdb_config, bulk_sync_s=3600.0)
        sim.netdb_config = no_periodic
        for db in sim.dbs.values():
            db.config = no_periodic
            db._bulk_at = sim.now + 3600.0
        sim.loss = 0.05
        victim = "node08"  # in all three networks
        assert all(victim in mem for mem in members.values())
        sim.kill(victim)
        sim.run_for(0.5)  # shorter than failure detection: the others still see it alive
        sim.restart(victim, via="node00")
        t0 = sim.now
        for nid in sorted(members):
            sim.api(victim, "join_network", nid)
            for key, (owner, value) in sorted(truth[nid].items()):
                if owner == victim:
                    sim.api(victim, "put", nid, key, value)

        def refilled() -> bool:
            db = sim.dbs[victim]
            return all(db.entries(nid) == truth[nid] for nid in members)

        ok = sim.run_until(sim.now + 20.0, stop=refilled, check_every_s=0.05)
        assert ok, "the restarted node's tables were not refilled without a periodic sync"
        print(f"restart refill: {sim.now - t0:.2f} s of virtual time")
        assert sim.dbs[victim].counters.get("initial_syncs_done", 0) == len(members)
