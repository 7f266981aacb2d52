"""Benchmark: program (then remove) 10,000 FDB + 10,000 neighbour entries on a VXLAN device.

A = swarmnet's NetlinkKernel.apply (batched raw netlink: many requests per sendmsg, acks
    read in bulk);
B = iproute2: ``bridge -batch FILE`` + ``ip -batch FILE`` via ``ip netns exec`` (one
    request, one ack wait per entry), the usual way a shell-out implementation does it.

Both run in the same private namespace ``snbench-<random>`` (always deleted), alternating
A/B order over the rounds so neither always runs warm. Each round checks the entries are
really there (snapshot, untimed) before removing them.

    sudo .venv/bin/python bench/fdb_program.py [--entries 10000] [--rounds 5]

Goal: median(A) / median(B) <= 1.5 for add + delete.
"""

from __future__ import annotations

import argparse
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import time

from swarmnet.kernel import (
    FdbAdd,
    FdbDel,
    FdbEntry,
    LinkSet,
    NeighAdd,
    NeighDel,
    NeighEntry,
    NetlinkKernel,
    VxlanAdd,
    VxlanAttrs,
)

DEV = "vx0"


def entries(n: int) -> tuple[list[FdbEntry], list[NeighEntry]]:
    fdb, neigh = [], []
    for i in range(n):
        mac = f"02:42:0a:{i >> 16 & 0xFF:02x}:{i >> 8 & 0xFF:02x}:{i & 0xFF:02x}"
        fdb.append(FdbEntry(DEV, mac, f"198.51.100.{2 + i % 250}"))
        neigh.append(NeighEntry(DEV, f"10.{i >> 16 & 0xFF}.{i >> 8 & 0xFF}.{i & 0xFF}", mac))
    return fdb, neigh


def count(k: NetlinkKernel) -> tuple[int, int]:
    s = k.snapshot()
    return len(s.fdb), len(s.neigh)


def run_ours(k: NetlinkKernel, fdb: list[FdbEntry], neigh: list[NeighEntry]) -> tuple[float, float]:
    adds = [FdbAdd(e) for e in fdb] + [NeighAdd(e) for e in neigh]
    dels = [FdbDel(e) for e in fdb] + [NeighDel(e) for e in neigh]
    t0 = time.perf_counter()
    k.apply(adds)
    t1 = time.perf_counter()
    assert count(k) == (len(fdb), len(neigh)), count(k)
    t2 = time.perf_counter()
    k.apply(dels)
    t3 = time.perf_counter()
    assert count(k) == (0, 0), count(k)
    return t1 - t0, t3 - t2


def run_ip(
    ns: str, k: NetlinkKernel, files: dict[str, str], n_fdb: int, n_neigh: int
) -> tuple[float, float]:
    def batch(tool: str, path: str) -> None:
        subprocess.run(["ip", "netns", "exec", ns, tool, "-batch", path], check=True)

    t0 = time.perf_counter()
    batch("bridge", files["fdb_add"])
    batch("ip", files["neigh_add"])
    t1 = time.perf_counter()
    assert count(k) == (n_fdb, n_neigh), count(k)
    t2 = time.perf_counter()
    batch("bridge", files["fdb_del"])
    batch("ip", files["neigh_del"])
    t3 = time.perf_counter()
    assert count(k) == (0, 0), count(k)
    return t1 - t0, t3 - t2


def write_batches(tmp: str, fdb: list[FdbEntry], neigh: list[NeighEntry]) -> dict[str, str]:
    lines = {
        "fdb_add": [f"fdb add {e.mac} dev {e.dev} dst {e.dst} self permanent" for e in fdb],
        "fdb_del": [f"fdb del {e.mac} dev {e.dev} dst {e.dst} self" for e in fdb],
        "neigh_add": [f"neigh add {e.ip} lladdr {e.mac} dev {e.dev} nud permanent" for e in neigh],
        "neigh_del": [f"neigh del {e.ip} dev {e.dev}" for e in neigh],
    }
    paths = {}
    for name, body in lines.items():
        paths[name] = os.path.join(tmp, name)
        with open(paths[name], "w") as f:
            f.write("\n".join(body) + "\n")
    return paths


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--entries", type=int, default=10_000)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()

    ns = "snbench-" + secrets.token_hex(3)
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        with NetlinkKernel(base_netns=ns) as k, tempfile.TemporaryDirectory() as tmp:
            # The VTEP address need not exist on the host for the device to be created and
            # brought up (the UDP socket binds to the wildcard address).
            k.apply(
                [
                    LinkSet("lo", up=True),
                    VxlanAdd(DEV, VxlanAttrs(vni=4242, local="198.51.100.1"), 1450),
                    LinkSet(DEV, up=True),
                ]
            )
            fdb, neigh = entries(args.entries)
            files = write_batches(tmp, fdb, neigh)
            ours: list[tuple[float, float]] = []
            ip: list[tuple[float, float]] = []
            print(f"{args.entries} FDB + {args.entries} neighbour entries on {DEV} in {ns}")
            print(f"{'round':>5} {'who':>9} {'add s':>8} {'del s':>8} {'total s':>8}")
            for r in range(args.rounds):
                order = ("ours", "ip-batch") if r % 2 == 0 else ("ip-batch", "ours")
                for who in order:
                    if who == "ours":
                        res = run_ours(k, fdb, neigh)
                        ours.append(res)
                    else:
                        res = run_ip(ns, k, files, len(fdb), len(neigh))
                        ip.append(res)
                    print(f"{r + 1:>5} {who:>9} {res[0]:8.3f} {res[1]:8.3f} {sum(res):8.3f}")
            med = {
                name: [statistics.median(x[i] for x in runs) for i in (0, 1)]
                + [statistics.median(sum(x) for x in runs)]
                for name, runs in (("ours", ours), ("ip-batch", ip))
            }
            for name, (a, d, t) in med.items():
                print(f"median {name:>9}: add {a:.3f} s, del {d:.3f} s, total {t:.3f} s")
            ratio = med["ours"][2] / med["ip-batch"][2]
            rate = 2 * args.entries / med["ours"][0]
            print(
                f"ratio ours/ip-batch (total): {ratio:.2f} (goal <= 1.5); ours adds {rate:,.0f}/s"
            )
            return 0 if ratio <= 1.5 else 1
    finally:
        subprocess.run(["ip", "netns", "delete", ns], check=False)


if __name__ == "__main__":
    sys.exit(main())
