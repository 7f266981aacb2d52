"""Gossip figures from the deterministic simulator: 1,000 real cores, LAN settings.

What it measures (issue 5, "Figures", simulator row), all in one run:

1. Broadcast propagation: time for a broadcast to reach 50 / 99 / 99.9 % of the nodes,
   - an alive with a new incarnation (a metadata update, what a refutation also is),
   - a user message that each node re-gossips the first time it sees it (how Serf's user
     events and our NetworkDB entries travel),
   with no loss and with 10 % loss. Serf's convergence simulator, default LAN settings: 99.9 %
   in about 2.0 s at 1,000 nodes (ANCHORS.md).
2. Detection: a node is killed; time until the first member declares it failed, and until
   every member has (p50/p99 over members), next to the Lifeguard timeouts for this size.
3. False positives: failed events among live nodes over some virtual minutes at 10 % loss.
4. Simulator speed: virtual seconds per wall-clock second.

The network model: one-way delay 0.2 ms + Exp(0.8 ms) (a LAN), independent loss per
datagram, TCP fallback pings lose their SYN/SYN-ACK with the same probability. The cluster
starts converged (every node knows every other), as Serf's simulator assumes.

    .venv/bin/python bench/gossip_sim.py [--nodes 1000] [--seed 1] [--loss-minutes 2]

No root needed. Exit status: 0 = goals met (broadcast 99.9 % within Serf's 2.0 s at 1,000
nodes with no loss, and zero false deaths at 10 % loss), 1 = not met.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from swarmnet.gossip.config import GossipConfig, suspicion_timeout_s  # noqa: E402
from swarmnet.gossip.core import MemberEvent  # noqa: E402
from swarmnet.gossip.sim import SimNetwork  # noqa: E402

SERF_999_AT_1000_S = 2.0


class Clock:
    """Wall time spent inside the simulator, for the speed figure."""

    def __init__(self) -> None:
        self.wall_s = 0.0
        self.virtual_s = 0.0

    def run(self, net: SimNetwork, seconds: float, stop=None) -> None:  # noqa: ANN001
        t0, v0 = time.perf_counter(), net.now
        net.run_until(net.now + seconds, stop=stop, check_every_s=0.05)
        self.wall_s += time.perf_counter() - t0
        self.virtual_s += net.now - v0


def build(nodes: int, seed: int, loss: float, clock: Clock) -> SimNetwork:
    t0 = time.perf_counter()
    net = SimNetwork(seed, GossipConfig.lan(), loss=loss)
    for i in range(nodes):
        net.add_node(f"n{i:04d}")
    net.bootstrap_full_mesh()
    print(f"  built {nodes} nodes (loss {loss:.0%}) in {time.perf_counter() - t0:.1f} s wall")
    clock.run(net, 5.0)  # let the staggered timers settle
    return net


def quantiles(times: list[float], n_receivers: int) -> tuple[float, float, float, int]:
    """Times to reach 50/99/99.9 % of the receivers (inf if never reached)."""
    ts = sorted(times)
    out = []
    for q in (0.5, 0.99, 0.999):
        need = max(1, int(q * n_receivers + 0.999999))
        out.append(ts[need - 1] if len(ts) >= need else float("inf"))
    return out[0], out[1], out[2], len(ts)


def broadcast_round(net: SimNetwork, clock: Clock, kind: str, origin: str, tag: int) -> tuple:
    first: dict[str, float] = {}
    payload = b"bench-%d" % tag
    t0 = net.now

    def hook(t: float, who: str, ev: MemberEvent) -> None:
        if who in first:
            return
        if kind == "alive" and ev.kind == "update" and ev.name == origin:
            first[who] = t - t0
        elif kind == "user" and ev.kind == "user" and ev.payload == payload:
            first[who] = t - t0
            net.cores[who].broadcast_user(payload)  # re-gossip on first sight, like Serf

    net.on_event = hook
    core = net.cores[origin]
    if kind == "alive":
        core.update_meta(b"tag-%d" % tag, net.now)
    else:
        core.broadcast_user(payload)
    net._after_input(origin)
    receivers = len(net.cores) - 1
    clock.run(net, 10.0, stop=lambda: len(first) >= receivers)
    clock.run(net, 2.0)  # let the rest of that broadcast drain before the next round
    net.on_event = None
    first.pop(origin, None)
    return quantiles(list(first.values()), receivers)


def bench_broadcast(args: argparse.Namespace, clock: Clock) -> dict[str, list[tuple]]:
    results: dict[str, list[tuple]] = {}
    for loss in (0.0, 0.10):
        net = build(args.nodes, args.seed, loss, clock)
        names = list(net.cores)
        for kind in ("alive", "user"):
            rows = []
            for r in range(args.repeats):
                origin = names[net.rng.randrange(len(names))]
                rows.append(broadcast_round(net, clock, kind, origin, r + 100 * len(results)))
            results[f"{kind} loss={loss:.0%}"] = rows
    return results


def bench_detection(args: argparse.Namespace, clock: Clock) -> list[tuple[float, float, float]]:
    net = build(args.nodes, args.seed + 1, 0.0, clock)
    out = []
    for _ in range(args.repeats):
        up = net.up()
        victim = up[net.rng.randrange(len(up))]
        t_kill = net.now
        mark = len(net.log)
        net.kill(victim)
        others = len(up) - 1

        def done(victim=victim, mark=mark, others=others) -> bool:  # noqa: ANN001
            seen = {w for _, w, e in net.log[mark:] if e.kind == "failed" and e.name == victim}
            return len(seen) >= others

        clock.run(net, 120.0, stop=done)
        times = sorted(
            t - t_kill for t, _, e in net.log[mark:] if e.kind == "failed" and e.name == victim
        )
        if not times:
            out.append((float("inf"),) * 3)
            continue
        out.append(
            (times[0], statistics.median(times), times[min(len(times) - 1, int(0.99 * others))])
        )
        clock.run(net, 5.0)
    return out


def bench_false_positives(args: argparse.Namespace, clock: Clock) -> dict[str, float]:
    net = build(args.nodes, args.seed + 2, 0.10, clock)
    mark = len(net.log)
    seconds = args.loss_minutes * 60.0
    clock.run(net, seconds)
    failed = [e for _, _, e in net.log[mark:] if e.kind == "failed"]
    tot: dict[str, int] = {}
    for c in net.cores.values():
        for k, v in c.counters.items():
            tot[k] = tot.get(k, 0) + v
    return {
        "virtual_s": seconds,
        "false_failed_events": len(failed),
        "probes": tot.get("probes", 0),
        "probe_failures": tot.get("probe_failures", 0),
        "refutes": tot.get("refutes", 0),
        "suspicion_verifications": tot.get("suspicion_verifications", 0),
        "lost": net.stats["lost"],
        "datagrams": net.stats["datagrams"],
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nodes", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3, help="broadcasts and kills per setting")
    ap.add_argument("--loss-minutes", type=float, default=2.0, help="virtual minutes at 10%% loss")
    args = ap.parse_args()
    clock = Clock()
    cfg = GossipConfig.lan()
    n = args.nodes
    min_s = suspicion_timeout_s(cfg.suspicion_mult, n, cfg.probe_interval_s)
    wall0 = time.perf_counter()
    print(f"gossip simulator: {n} nodes, LAN settings, seed {args.seed}")

    print("\n1. broadcast propagation (seconds to reach 50 / 99 / 99.9 % of the other nodes)")
    bres = bench_broadcast(args, clock)
    p999_clean = []
    for label, rows in bres.items():
        for p50, p99, p999, got in rows:
            print(
                f"  {label:18s} p50 {p50:6.3f}  p99 {p99:6.3f}  p99.9 {p999:6.3f}  ({got} reached)"
            )
        if "loss=0%" in label:
            p999_clean += [r[2] for r in rows]
        med = statistics.median(r[2] for r in rows)
        print(
            f"  {label:18s} median p99.9 {med:.3f} s  (Serf's simulator: ~{SERF_999_AT_1000_S} s)"
        )

    print("\n2. detection of a killed node (seconds after the kill)")
    print(
        f"  Lifeguard timeouts at n={n}: min {min_s:.1f} s (k={cfg.suspicion_mult - 2} "
        f"confirmations), max {cfg.suspicion_max_timeout_mult * min_s:.1f} s (lone accuser)"
    )
    det = bench_detection(args, clock)
    for first, med, p99 in det:
        print(f"  first member {first:6.2f}   all members p50 {med:6.2f}  p99 {p99:6.2f}")

    print(f"\n3. false positives at 10% loss over {args.loss_minutes:g} virtual minutes")
    fp = bench_false_positives(args, clock)
    for k, v in fp.items():
        print(f"  {k:24s} {v:g}")

    wall = time.perf_counter() - wall0
    print("\n4. simulator speed")
    print(
        f"  {clock.virtual_s:.0f} virtual s in {clock.wall_s:.1f} s wall inside the simulator: "
        f"{clock.virtual_s / clock.wall_s:.1f}x real time at {n} nodes (whole run {wall:.0f} s)"
    )

    ok = fp["false_failed_events"] == 0
    if n >= 1000:
        ok = ok and max(p999_clean) <= SERF_999_AT_1000_S
    print(
        f"\ngoals (99.9% within {SERF_999_AT_1000_S} s, zero false deaths): {'met' if ok else 'NOT met'}"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
