"""NetworkDB figures from the deterministic simulator: 1,000 real membership cores, each with
a NetworkDB, LAN settings (issue 5, "Figures").

What it measures, side by side in one run: an endpoint ``put`` on one member of a network,
and at the same instant a plain membership broadcast (an alive with a new incarnation, i.e.
a metadata update, which every member re-gossips: memberlist's own fastest path). For each,
the time until 50 / 99 % of the receivers have it: the members of the entry's network for
the put (its table event "add"), every node for the broadcast ("update" member event).
Several trials, with no loss and with 10 % loss.

The cluster starts converged: members know each other and who is in which network (seeded
quietly, as Serf's simulator assumes a converged cluster). The network model is
swarmnet.gossip.sim's LAN: 0.2 ms + Exp(0.8 ms) one way, independent loss per datagram.

    .venv/bin/python bench/netdb_sim.py [--nodes 1000] [--networks 5] [--trials 5] [--seed 1]
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests" / "unit"))

from test_netdb_sim import NetDBSim  # noqa: E402  (the driver wiring, shared with the test)

from swarmnet.gossip.netdb import MSG_NET_SYNC, _pack  # noqa: E402


def quantile(times: list[float], n: int, q: float) -> float:
    need = max(1, int(q * n + 0.999999))
    ts = sorted(times)
    return ts[need - 1] if len(ts) >= need else float("inf")


def build(nodes: int, networks: int, seed: int, loss: float) -> tuple[NetDBSim, dict]:
    t0 = time.perf_counter()
    sim = NetDBSim(seed, loss=loss)
    names = [f"n{i:04d}" for i in range(nodes)]
    for name in names:
        sim.add(name)
    sim.bootstrap_full_mesh()
    pick = random.Random(seed)
    members = {
        f"net{k}": sorted(pick.sample(names, pick.randint(nodes // 5, nodes // 2)))
        for k in range(networks)
    }
    records = [[n, nid, 1, False] for nid, mem in members.items() for n in mem]
    chunks = [records[i : i + 40] for i in range(0, len(records), 40)]
    payloads = [_pack(MSG_NET_SYNC, ["seed"], c, False) for c in chunks]
    for name in names:  # quiet seeding: nothing of it goes on the simulated wire
        db = sim.dbs[name]
        for other in names:
            if other != name:
                db.on_member("join", other, sim.now)
        for nid, mem in members.items():
            if name in mem:
                db.join_network(nid, sim.now)
        for p in payloads:
            db.receive("", p, sim.now)
        # A converged cluster has had its join syncs answered long ago: drop the ones the
        # seeding just started (their bulk syncs, and their retries, would skew the figures).
        db._unsynced.clear()
        db._sync_retry.clear()
        db.take_outbound()
        db.take_events()
        sim._flush(name)
    print(
        f"  built {nodes} nodes, networks of {[len(m) for m in members.values()]} members,"
        f" loss {loss:.0%}, in {time.perf_counter() - t0:.1f} s wall"
    )
    sim.run_for(5.0)
    return sim, members


def trial(
    sim: NetDBSim, members: dict, rng: random.Random, tag: int
) -> tuple[list, int, list, int]:
    nid = rng.choice(sorted(members))
    putter = rng.choice(members[nid])
    origin = rng.choice(sorted(set(sim.cores) - {putter}))
    key = f"bench-{tag}"
    mark_t, mark_m = len(sim.table_log), len(sim.log)
    t0 = sim.now
    sim.api(putter, "put", nid, key, b"x" * 150)  # an endpoint is about 150 bytes
    sim.cores[origin].update_meta(b"tag-%d" % tag, sim.now)
    sim._after_input(origin)
    want_put = len(members[nid]) - 1
    want_bc = len(sim.cores) - 1
    put_t: dict[str, float] = {}
    bc_t: dict[str, float] = {}

    def done() -> bool:
        nonlocal mark_t, mark_m
        for t, who, ev in sim.table_log[mark_t:]:
            if ev.key == key and ev.kind == "add" and who != putter:
                put_t.setdefault(who, t - t0)
        for t, who, ev in sim.log[mark_m:]:
            if ev.kind == "update" and ev.name == origin and who != origin:
                bc_t.setdefault(who, t - t0)
        mark_t, mark_m = len(sim.table_log), len(sim.log)
        return len(put_t) >= want_put and len(bc_t) >= want_bc

    sim.run_until(sim.now + 30.0, stop=done, check_every_s=0.01)
    done()
    sim.run_for(2.0)
    return list(put_t.values()), want_put, list(bc_t.values()), want_bc


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--nodes", type=int, default=1000)
    ap.add_argument("--networks", type=int, default=5)
    ap.add_argument("--trials", type=int, default=5)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    for loss in (0.0, 0.10):
        print(f"NetworkDB put vs membership broadcast, {args.nodes} nodes, loss {loss:.0%}")
        sim, members = build(args.nodes, args.networks, args.seed, loss)
        rng = random.Random(args.seed)
        rows = []
        w0, v0 = time.perf_counter(), sim.now
        for i in range(args.trials):
            put, n_put, bc, n_bc = trial(sim, members, rng, i)
            row = (
                quantile(put, n_put, 0.5),
                quantile(put, n_put, 0.99),
                quantile(bc, n_bc, 0.5),
                quantile(bc, n_bc, 0.99),
            )
            rows.append(row)
            print(
                f"  trial {i}: put to {n_put} network members p50 {row[0]:.3f} s"
                f" p99 {row[1]:.3f} s (reached {len(put)}) | broadcast to {n_bc} nodes"
                f" p50 {row[2]:.3f} s p99 {row[3]:.3f} s (reached {len(bc)})"
            )
        med = [statistics.median(r[i] for r in rows) for i in range(4)]
        print(
            f"  median of trials: put p50 {med[0]:.3f} s p99 {med[1]:.3f} s;"
            f" membership broadcast p50 {med[2]:.3f} s p99 {med[3]:.3f} s"
        )
        wall = time.perf_counter() - w0
        print(f"  simulator: {sim.now - v0:.1f} virtual s in {wall:.1f} wall s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
