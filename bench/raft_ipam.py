"""IPAM allocations committed per second: swarmnet's Store vs a raw pysyncobj counter.

Same machine, same run, alternating contenders, each on a fresh 3-process cluster on
loopback (bench/raft_cluster.py). Writes are issued inside the leader process, pipelined
(``--window`` outstanding), like a manager issues them:

- store+fsync: ``create_network`` (allocates a /24 and a VNI in the replicated IPAM), with
  group commit (one msync per tick before any ack): what swarmnet ships;
- store-nofsync: the same without the msync (the ratio is the cost of durability);
- raw: pysyncobj's ReplCounter.inc, same SyncObjConf, nothing synced (RESULTS' baseline).

Also a latency-bound figure: one write at a time (``--window 1``).
Goal (issue 4): store+fsync >= 0.8x raw. Exit 0 if met, 1 if not.

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
}


def run_one(name: str, n: int, window: int, rnd: int) -> dict:
    c = Cluster(n=3, **CONTENDERS[name], first_host=71 + 3 * rnd)
    try:
        c.start_all()
        c.init()
        leader = c.leader()
        # warm-up (connections, code paths)
        c.call(leader, "/bench", {"n": 200, "window": 50, "prefix": "w"}, timeout=120)
        _, r = c.call(leader, "/bench", {"n": n, "window": window, "prefix": "p"}, timeout=600)
        _, lat = c.call(leader, "/bench", {"n": 300, "window": 1, "prefix": "l"}, timeout=600)
        syncs = (c.status(leader) or {}).get("syncs", 0)
        return {
            "contender": name,
            "round": rnd,
            "rate": r["n"] / r["elapsed"],
            "failures": r["failures"],
            "seq_rate": lat["n"] / lat["elapsed"],
            "leader_syncs": syncs,
        }
    finally:
        c.close()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=3000)
    ap.add_argument("--window", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    rows = []
    names = list(CONTENDERS)
    for rnd in range(args.rounds):
        order = names if rnd % 2 == 0 else names[::-1]
        for name in order:
            row = run_one(name, args.n, args.window, rnd)
            rows.append(row)
            print(
                f"round {rnd} {name:14s} pipelined {row['rate']:8.0f}/s "
                f"(failures {row['failures']}, leader msyncs {row['leader_syncs']})  "
                f"one-at-a-time {row['seq_rate']:7.0f}/s",
                flush=True,
            )
    med = {
        n: (
            statistics.median(r["rate"] for r in rows if r["contender"] == n),
            statistics.median(r["seq_rate"] for r in rows if r["contender"] == n),
        )
        for n in names
    }
    print("\nmedians (pipelined, one-at-a-time):")
    for n, (p, s) in med.items():
        print(f"  {n:14s} {p:8.0f}/s {s:8.0f}/s")
    goal = med["store+fsync"][0] / med["raw"][0]
    print(f"store+fsync / raw (pipelined): {goal:.2f}   (goal >= 0.8)")
    print(f"store-nofsync / raw (pipelined): {med['store-nofsync'][0] / med['raw'][0]:.2f}")
    print(
        f"cost of durability, store+fsync / store-nofsync: pipelined "
        f"{med['store+fsync'][0] / med['store-nofsync'][0]:.2f}, one-at-a-time "
        f"{med['store+fsync'][1] / med['store-nofsync'][1]:.2f}"
    )
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "medians": med}, indent=2))
    return 0 if goal >= 0.8 else 1


if __name__ == "__main__":
    sys.exit(main())
