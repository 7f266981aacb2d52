"""IPAM allocations committed per second: swarmnet's Store vs raw pysyncobj.

Same machine, same run, alternating contenders, each on a fresh 3-process cluster on
loopback (bench/raft_cluster.py). Writes are issued inside the leader process, pipelined
(``--window`` outstanding), like a manager issues them:

- store+fsync: ``create_network`` (allocates a /24 and a VNI in the replicated IPAM), with
  group commit (one msync per batch before any ack): what swarmnet ships;
- store-nofsync: the same without the msync (the ratio is the cost of durability);
- raw: pysyncobj's ReplCounter.inc, same SyncObjConf, nothing synced (issue 4's baseline;
  its command is a bare counter increment);
- raw-state: bare pysyncobj running the SAME ClusterState.apply(create_network) (same IPAM
  work, same command dict, pickled by pysyncobj) without the Store around it: no msgpack,
  no lock, no group commit, no batched delivery. store-nofsync / raw-state is the cost of
  our layer alone, like for like.

Also a latency-bound figure: one write at a time (``--seq-n`` writes, window 1).
Goal (issue 4): store+fsync >= 0.8x raw (the counter), pipelined. Exit 0 if met, 1 if not.

    .venv/bin/python bench/raft_ipam.py [--n 3000] [--window 200] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from raft_cluster import Cluster  # noqa: E402

CONTENDERS = {
    "store+fsync": {"mode": "store", "fsync": True},
    "store-nofsync": {"mode": "store", "fsync": False},
    "raw": {"mode": "raw", "fsync": False},
    "raw-state": {"mode": "raw-state", "fsync": False},
}

RATIOS = [  # (numerator, denominator, what it says)
    ("store+fsync", "raw", "issue 4 goal (>= 0.8): durable store vs the raw counter"),
    ("store-nofsync", "raw", "store without fsync vs the raw counter"),
    ("store+fsync", "raw-state", "durable store vs bare pysyncobj doing the same IPAM work"),
    ("store-nofsync", "raw-state", "our layer alone (like for like, no fsync on either)"),
    ("store+fsync", "store-nofsync", "cost of durability"),
]


def run_one(name: str, n: int, window: int, seq_n: int, rnd: int, extra: tuple) -> dict:
    c = Cluster(n=3, **CONTENDERS[name], first_host=71 + 3 * (rnd % 8), extra_args=extra)
    try:
        c.start_all()
        c.init()
        leader = c.leader()
        # warm-up (connections, code paths)
        c.call(leader, "/bench", {"n": 200, "window": 50, "prefix": "w"}, timeout=120)
        cpu0 = c.cpu_seconds()
        _, r = c.call(leader, "/bench", {"n": n, "window": window, "prefix": "p"}, timeout=600)
        cpu1 = c.cpu_seconds()
        _, lat = c.call(leader, "/bench", {"n": seq_n, "window": 1, "prefix": "l"}, timeout=600)
        cpu2 = c.cpu_seconds()
        syncs = (c.status(leader) or {}).get("syncs", 0)
        return {
            "contender": name,
            "round": rnd,
            "rate": r["n"] / r["elapsed"],
            "failures": r["failures"] + lat["failures"],
            "seq_rate": lat["n"] / lat["elapsed"],
            "leader_syncs": syncs,
            # CPU of the 3 node processes per write, in microseconds: stable under load
            "cpu_us": (cpu1 - cpu0) / n * 1e6,
            "seq_cpu_us": (cpu2 - cpu1) / seq_n * 1e6,
        }
    finally:
        c.close()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=3000)
    ap.add_argument("--window", type=int, default=200)
    ap.add_argument("--seq-n", type=int, default=300)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--contenders", default=",".join(CONTENDERS))
    ap.add_argument(
        "--name-index",
        action="store_true",
        help="experiment: O(1) network_by_name in every node (bench/raft_node.py)",
    )
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    extra = ("--name-index",) if args.name_index else ()
    rows = []
    names = args.contenders.split(",")
    for rnd in range(args.rounds):
        k = rnd % len(names)  # rotate, and reverse every other round: no fixed position
        order = names[k:] + names[:k]
        if rnd % 2:
            order = order[::-1]
        for name in order:
            row = run_one(name, args.n, args.window, args.seq_n, rnd, extra)
            rows.append(row)
            print(
                f"round {rnd} {name:14s} pipelined {row['rate']:8.0f}/s "
                f"(failures {row['failures']}, leader msyncs {row['leader_syncs']})  "
                f"one-at-a-time {row['seq_rate']:7.0f}/s  cluster CPU per write "
                f"{row['cpu_us']:4.0f} us pipelined, {row['seq_cpu_us']:4.0f} us one at a time",
                flush=True,
            )
    med = {
        n: tuple(
            statistics.median(r[k] for r in rows if r["contender"] == n)
            for k in ("rate", "seq_rate", "cpu_us", "seq_cpu_us")
        )
        for n in names
    }
    print("\nmedians: writes/s pipelined, one-at-a-time; cluster CPU us per write, same:")
    for n, (p, s, cp, cs) in med.items():
        print(f"  {n:14s} {p:8.0f}/s {s:8.0f}/s {cp:8.0f} us {cs:8.0f} us")

    def per_round(a: str, b: str, key: str) -> list[float]:
        out = []
        for rnd in range(args.rounds):
            ra = [r[key] for r in rows if r["round"] == rnd and r["contender"] == a]
            rb = [r[key] for r in rows if r["round"] == rnd and r["contender"] == b]
            if ra and rb:
                out.append(ra[0] / rb[0])
        return out

    print("\nratios: median of per-round ratios [each round]  (pipelined | one-at-a-time)")
    ratios = {}
    for a, b, what in RATIOS:
        if a not in names or b not in names:
            continue
        rp, rs = per_round(a, b, "rate"), per_round(a, b, "seq_rate")
        ratios[f"{a}/{b}"] = {"pipelined": rp, "seq": rs}
        print(
            f"  {a + ' / ' + b:30s} {statistics.median(rp):.2f} "
            f"[{' '.join(f'{x:.2f}' for x in rp)}] | {statistics.median(rs):.2f} "
            f"[{' '.join(f'{x:.2f}' for x in rs)}]   {what}"
        )
    print("\nCPU per write, ratio of medians (pipelined | one-at-a-time; < 1: cheaper)")
    for a, b, _what in RATIOS:
        if a in names and b in names:
            print(
                f"  {a + ' / ' + b:30s} {med[a][2] / med[b][2]:.2f} | {med[a][3] / med[b][3]:.2f}"
            )
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "medians": med, "ratios": ratios}, indent=2))
    if "store+fsync" not in names or "raw" not in names:
        return 0
    goal = statistics.median(per_round("store+fsync", "raw", "rate"))
    return 0 if goal >= 0.8 else 1


if __name__ == "__main__":
    sys.exit(main())
