"""Leader failover time of swarmnet's Store: SIGKILL the leader process, 20 times.

Measured like ../shared/pysyncobj/RESULTS.md T3: at t0 the leader is SIGKILLed; each
survivor then starts one write every 50 ms (2 s timeout each); the figure is t0 -> the first
acknowledged write that started after t0. The killed node is restarted once a new leader is
known, and catch-up (its index equal to the leader's) is timed too. Every acknowledged write
is checked on every node at the end. 3 processes on loopback, fsync on (group commit).

    .venv/bin/python bench/raft_failover.py [--kills 20] [--no-fsync]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from raft_cluster import Cluster  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--kills", type=int, default=20)
    ap.add_argument("--no-fsync", action="store_true")
    args = ap.parse_args()
    c = Cluster(n=3, fsync=not args.no_fsync, first_host=91)
    failover, catchup, acked = [], [], set()
    seq = iter(range(10**9))
    try:
        c.start_all()
        c.init()
        for k in range(args.kills):
            leader = c.leader()
            c.call(leader, "/write", {"name": f"pre{k}"})
            t0 = time.monotonic()
            c.kill(leader)
            first: list[float] = []
            done = threading.Event()

            def writer(i: int, t0: float = t0, done=done, first=first) -> None:
                while not done.is_set():
                    start = time.monotonic()
                    name = f"w{next(seq)}"
                    try:
                        code, _ = c.call(i, "/write", {"name": name}, timeout=2.0)
                    except OSError:
                        code = 0
                    if code == 200:
                        acked.add(name)
                        if start >= t0:
                            first.append(time.monotonic() - t0)
                            done.set()
                    time.sleep(max(0.0, 0.05 - (time.monotonic() - start)))

            threads = [threading.Thread(target=writer, args=(i,)) for i in c.alive()]
            for t in threads:
                t.start()
            done.wait(60)
            for t in threads:
                t.join()
            failover.append(min(first))
            t1 = time.monotonic()
            c.start(leader)
            new = c.leader()
            while True:
                a, b = c.status(leader), c.status(new)
                if a and b and a["index"] >= b["index"]:
                    break
                time.sleep(0.02)
            catchup.append(time.monotonic() - t1)
            print(
                f"kill {k + 1:2d}: failover {failover[-1]:.2f} s, catch-up {catchup[-1]:.2f} s",
                flush=True,
            )
        leader = c.leader()
        missing = [
            len(acked - set((c.status(i) or {"networks": []})["networks"])) for i in range(3)
        ]
        print(
            f"\nfailover (kill -> first new write committed), n={len(failover)}: "
            f"median {statistics.median(failover):.2f} s, max {max(failover):.2f} s, "
            f"min {min(failover):.2f} s"
        )
        print(
            f"catch-up after restart: median {statistics.median(catchup):.2f} s, "
            f"max {max(catchup):.2f} s"
        )
        print(f"acknowledged writes: {len(acked)}, missing per node: {missing}")
        return 0 if not any(missing) else 1
    finally:
        c.close()


if __name__ == "__main__":
    sys.exit(main())
