"""nftables LB programming: 1,000 services x 10 backends through the NftBackend (one
libnftables transaction), then ONE backend change (one small transaction: our own nf_tables
netlink batch), against loading the same full ruleset with `nft -f` (a process), same run,
in a private namespace. For comparison it also times the same change committed through
libnftables (``NftConfig(netlink_changes=False)``, the previous design).

Goals (issue 6): our full load <= 1.5x `nft -f`; one change >= 50x faster than a full load.
Each run times ``--changes`` single changes (alternating one way and back) after its full
load; "first change" reports the first of each run alone (it runs while the kernel still
frees the table the full load replaced).
Run as root: .venv/bin/python bench/lb_nft.py [--services 1000 --backends 10 --runs 5]
"""

from __future__ import annotations

import argparse
import os
import secrets
import statistics
import subprocess
import tempfile
import time

from swarmnet.lb.nft import NftBackend, NftConfig, render
from swarmnet.lb.plan import Backend, LBService, LBState, nft_full


def state(services: int, backends: int, changed: bool = False) -> LBState:
    out = []
    for s in range(services):
        vip = f"10.{100 + s // 250}.{s % 250}.2"
        bes = [Backend(f"10.50.{s % 250}.{b + 10}", 8080) for b in range(backends)]
        if changed and s == services // 2:
            bes[0] = Backend("10.60.0.1", 8080)  # one backend replaced in one service
        out.append(LBService(vip, "tcp", 80, tuple(bes)))
    return LBState(frozenset(out))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--services", type=int, default=1000)
    ap.add_argument("--backends", type=int, default=10)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--changes", type=int, default=10)
    a = ap.parse_args()
    ns = "sntest-" + secrets.token_hex(4)
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        base, alt = state(a.services, a.backends), state(a.services, a.backends, True)
        text = render(nft_full(base), NftConfig())
        with tempfile.NamedTemporaryFile("w", suffix=".nft", delete=False) as f:
            f.write(text)
        nft_f, ours_full, ours_one, lib_one, first = [], [], [], [], []
        lb = NftBackend(netns=ns)
        lib = NftBackend(netns=ns, config=NftConfig(netlink_changes=False))
        for _ in range(a.runs):
            t = time.perf_counter()
            subprocess.run(["ip", "netns", "exec", ns, "nft", "-f", f.name], check=True)
            nft_f.append(time.perf_counter() - t)
            t = time.perf_counter()
            lb.full_sync(base)
            ours_full.append(time.perf_counter() - t)
            for i in range(a.changes):  # one change, one way and back
                t = time.perf_counter()
                ch = lb.sync(alt if i % 2 == 0 else base)
                ours_one.append(time.perf_counter() - t)
                assert len(ch) == 1
                if i == 0:
                    first.append(ours_one[-1])
            lb.sync(base)
            assert lb.dump() == base  # read back through libnftables after netlink changes
            lib.full_sync(base)
            for i in range(a.changes):
                t = time.perf_counter()
                lib.sync(alt if i % 2 == 0 else base)
                lib_one.append(time.perf_counter() - t)
        assert lb.dump() == base
        lb.close()
        lib.close()
        os.unlink(f.name)
        m_nft, m_full, m_one = (statistics.median(x) for x in (nft_f, ours_full, ours_one))
        print(f"{a.services} services x {a.backends} backends, {len(text.splitlines())} nft "
              f"lines, {a.runs} runs, medians (min-max):")  # fmt: skip
        for name, xs in (("nft -f (process)", nft_f), ("NftBackend full_sync", ours_full),
                         ("NftBackend one change", ours_one), ("(first change of a run)", first),
                         ("(libnftables change)", lib_one)):  # fmt: skip
            print(f"  {name:24s} {statistics.median(xs) * 1000:8.2f} ms "
                  f"({min(xs) * 1000:.2f}-{max(xs) * 1000:.2f})")  # fmt: skip
        print(f"  full / nft -f = {m_full / m_nft:.2f}x (goal <= 1.5x)")
        print(f"  nft -f / one change = {m_nft / m_one:.0f}x, "
              f"our full / one change = {m_full / m_one:.0f}x (goal >= 50x)")  # fmt: skip
        print(f"  our full / first change of a run = {m_full / statistics.median(first):.0f}x")
        print(f"  (our full / libnftables change = {m_full / statistics.median(lib_one):.0f}x)")
    finally:
        subprocess.run(["ip", "netns", "delete", ns], capture_output=True)


if __name__ == "__main__":
    main()
