"""Leader failover time of swarmnet's Store: SIGKILL the leader process, 20 times.

Measured like ../shared/pysyncobj/RESULTS.md T3: at t0 the leader is SIGKILLed; each
survivor then starts one write every 50 ms (each in its own thread, 2 s timeout, whether or
not the previous one answered); the figure is t0 -> the first acknowledged write that
started after t0. The killed node is restarted once a new leader is
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


def every_50ms(targets: list[int], one, done: threading.Event) -> list[threading.Thread]:
    """Start ``one(i)`` for each target every 50 ms in its own thread until ``done``;
    returns once done (60 s at most) and every started write has finished."""
    started: list[threading.Thread] = []
    deadline = time.monotonic() + 60
    while not done.is_set() and time.monotonic() < deadline:
        tick = time.monotonic()
        for i in targets:
            t = threading.Thread(target=one, args=(i,))
            t.start()
            started.append(t)
        done.wait(max(0.0, 0.05 - (time.monotonic() - tick)))
    for t in started:
        t.join()
    return started


def run_failover(kills: int, fsync: bool = True, extra_args: tuple[str, ...] = ()) -> dict:
    """``kills`` SIGKILLs of the leader; returns the per-kill figures (seconds) and the
    acknowledged-write check. Prints one line per kill."""
    c = Cluster(n=3, fsync=fsync, first_host=91, extra_args=extra_args)
    failover: list[float] = []
    catchup: list[float] = []
    acked: set[str] = set()
    seq = iter(range(10**9))
    try:
        c.start_all()
        c.init()
        for k in range(kills):
            leader = c.leader()
            c.call(leader, "/write", {"name": f"pre{k}"})
            t0 = time.monotonic()
            c.kill(leader)
            first: list[float] = []
            done = threading.Event()

            def one(i: int, t0: float = t0, done=done, first=first) -> None:
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

            # Like RESULTS T3: each survivor STARTS one write every 50 ms, whether or not the
            # previous one has answered (a write stuck on the dead leader does not hold the
            # next one back).
            every_50ms(c.alive(), one, done)
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
                f"  store kill {k + 1:2d}: failover {failover[-1]:.2f} s, "
                f"catch-up {catchup[-1]:.2f} s",
                flush=True,
            )
        c.leader()
        missing = [
            len(acked - set((c.status(i) or {"networks": []})["networks"])) for i in range(3)
        ]
        return {"failover": failover, "catchup": catchup, "acked": len(acked), "missing": missing}
    finally:
        c.close()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--kills", type=int, default=20)
    ap.add_argument("--no-fsync", action="store_true")
    args = ap.parse_args()
    r = run_failover(args.kills, fsync=not args.no_fsync)
    failover, catchup, missing = r["failover"], r["catchup"], r["missing"]
    print(
        f"\nfailover (kill -> first new write committed), n={len(failover)}: "
        f"median {statistics.median(failover):.2f} s, max {max(failover):.2f} s, "
        f"min {min(failover):.2f} s"
    )
    print(
        f"catch-up after restart: median {statistics.median(catchup):.2f} s, "
        f"max {max(catchup):.2f} s"
    )
    print(f"acknowledged writes: {r['acked']}, missing per node: {missing}")
    return 0 if not any(missing) else 1


if __name__ == "__main__":
    sys.exit(main())
