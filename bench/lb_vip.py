"""Connections through a VIP with 10 vs 1,000 services programmed (issue 6's figure "flat
per-packet cost"), against a LINEAR ruleset (iptables / kube-proxy-iptables style) that
must show the cost growing, same run, finely interleaved.

Topology, all in private namespaces ``sntest-<hex><role>`` (nothing in the root one): one
client ``c``, two backends ``a`` and ``b``, and FOUR routers ``r0``-``r3``, one per ruleset,
each joined to c, a and b by its own veth pairs (subnets 10.78.k / 10.79.k / 10.80.k)::

    c 10.78.k.2 --veth-- 10.78.k.1  rk (DNAT)  10.79.k.1 --veth-- 10.79.k.2 a
                                               10.80.k.1 --veth-- 10.80.k.2 b

Ruleset k serves VIP 10.96.0.(k+1):80/tcp over a:8080 and b:8080 (a tiny accept-and-close
server in each); c routes that VIP through rk, and a and b route c's 10.78.k address back
through rk (so rk's conntrack sees both directions). As every ruleset is live at once,
switching from one to another costs nothing: measurements are short slices rotated every
round, so the machine's background load (other labs, VMs: load averages of 8-11 on 2 cores
were seen) hits the four alike. The four rulesets:

- ``nft10`` / ``nft1000``: swarmnet's ``NftBackend`` (public API only: ``NftBackend``,
  ``NftConfig``, ``LBState``, ``LBService``, ``Backend``) with 10, resp. 1,000 services x 10
  backends (the measured VIP is one of them, with its 2 real backends): one verdict-map hash
  lookup per new connection, whatever the count;
- ``lin10`` / ``lin1000``: the control. One nat prerouting chain of 10, resp. 1,000 rules
  ``ip daddr X tcp dport Y dnat ip to numgen random mod N map {...}``, the measured VIP LAST
  (a service late in iptables' KUBE-SERVICES chain), loaded with ``nft -f``. If lin1000/lin10
  is not clearly below 1, the load generator cannot see a per-connection kernel cost and
  nft1000/nft10 proves nothing.

Two measurements, both with worker processes in c:

1. Throughput (what the issue's figure names): each worker keeps ``--conc`` non-blocking
   connects in flight; a connection counts when its handshake completes and is then closed
   with SO_LINGER 0 (a RST: no TIME_WAIT, ports are reused at once). ``--rounds`` rounds of
   four ``--seconds`` slices, order rotated. Each new connection's SYN is a NEW conntrack
   entry in the router, so it runs the nat chain exactly once (later packets never do).
   Under background load this figure swings 10x between slices of the same ruleset: read it
   with care.
2. Per-connection cost (the robust figure): serial blocking connects taken in turn over the
   four VIPs (A B C D A B C D ...), each timed. Over veths the whole handshake, including the
   router's nat chain, runs inside connect(), so its median is the kernel path's cost;
   taking the VIPs in turn makes the scheduler's stealing hit the four alike. Rates are
   1 / median (connections/s of one serial client); ratios 1000/10 are rate ratios.

Run as root: .venv/bin/python bench/lb_vip.py [--rounds 12 --seconds 0.5 --workers 2
--conc 64 --lat-rounds 5 --connects 2000 --json FILE]
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import secrets
import select
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time

from swarmnet.lb.nft import NftBackend, NftConfig
from swarmnet.lb.plan import Backend, LBService, LBState

VPORT, BPORT = 80, 8080
CONFIGS = ("nft10", "nft1000", "lin10", "lin1000")  # router k runs CONFIGS[k]
NFT_TABLE = "lbvipbench"  # NftBackend's table in r0 and r1
LIN_TABLE = "linbench"  # the linear control's table in r2 and r3
# conntrack timeouts in the routers: every connection ends with a RST (state CLOSE, 10 s by
# default); at ~10k connections/s that is 100k live entries. 1 s keeps the tables small.
CT_SYSCTLS = {
    "net.netfilter.nf_conntrack_tcp_timeout_close": "1",
    "net.netfilter.nf_conntrack_tcp_timeout_time_wait": "1",
    "net.netfilter.nf_conntrack_tcp_timeout_syn_sent": "5",
    "net.netfilter.nf_conntrack_tcp_timeout_established": "30",
}


def vip(k: int) -> str:
    return f"10.96.0.{k + 1}"


def real_backends(k: int) -> tuple[str, str]:
    return (f"10.79.{k}.2", f"10.80.{k}.2")


# ---- the processes inside the namespaces (re-executed: `lb_vip.py --server/--worker`) ------


def serve(port: int) -> None:
    """Accept and close, as fast as Python can: the server is not what is measured."""
    s = socket.socket()
    # A plain close (FIN), not a RST: a RST can reach the client before it has looked at
    # its connect's outcome (everything runs in one softirq pass over the veths), which
    # then reads ECONNRESET. The client's own RST then ends this side without TIME_WAIT.
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", port))
    s.listen(4096)
    print("ready", flush=True)
    while True:
        try:
            c, _ = s.accept()
            c.close()
        except OSError:
            continue


def worker(conc: int) -> None:
    """Serve commands on stdin, one JSON answer line each: ``run VIP SECONDS`` (throughput:
    ``{"ok": n, "fail": n}``) or ``lat N VIP...`` (``{VIP: [ns, ...]}``)."""
    print("ready", flush=True)
    for line in sys.stdin:
        cmd, *args = line.split()
        if cmd == "run":
            ok, fail = connect_loop(args[0], VPORT, conc, float(args[1]))
            print(json.dumps({"ok": ok, "fail": fail}), flush=True)
        elif cmd == "lat":
            print(json.dumps(connect_times(args[1:], VPORT, int(args[0]))), flush=True)
        else:
            break


def connect_times(vips: list[str], port: int, n: int) -> dict[str, list[int]]:
    """``n`` blocking connects to each VIP, the VIPs taken in turn (A B C D A B C D ...), each
    timed alone. Over veths the whole handshake runs inside connect() (the SYN crosses the
    router's nat chain, the SYN-ACK comes back in the same softirq pass), so its duration is
    the kernel path's cost plus whatever the scheduler steals; taking the VIPs in turn makes
    the stealing hit them alike, and the median of each is robust to it."""
    linger = struct.pack("ii", 1, 0)
    out: dict[str, list[int]] = {v: [] for v in vips}
    for _ in range(n):
        for v in vips:
            s = socket.socket()
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
            t = time.perf_counter_ns()
            try:
                s.connect((v, port))
            except OSError:
                out[v].append(-1)
            else:
                out[v].append(time.perf_counter_ns() - t)
            s.close()
    return out


def connect_loop(vip: str, port: int, conc: int, seconds: float) -> tuple[int, int]:
    linger = struct.pack("ii", 1, 0)
    ep = select.epoll()
    socks: dict[int, socket.socket] = {}
    ok = fail = 0

    def start() -> None:
        nonlocal fail
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
        rc = s.connect_ex((vip, port))
        if rc not in (0, errno.EINPROGRESS):
            fail += 1
            s.close()
            return
        socks[s.fileno()] = s
        ep.register(s.fileno(), select.EPOLLOUT)

    for _ in range(conc):
        start()
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        for fd, _ev in ep.poll(0.05):
            s = socks.pop(fd)
            ep.unregister(fd)
            if s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0:
                ok += 1
            else:
                fail += 1
            s.close()
            start()
    for s in socks.values():
        s.close()
    ep.close()
    return ok, fail


# ---- the orchestrator -------------------------------------------------------------------


def sh(*argv: str, input: str | None = None) -> None:
    subprocess.run(argv, check=True, input=input, text=True, capture_output=True)


def nsx(ns: str, *argv: str) -> list[str]:
    return ["ip", "netns", "exec", ns, *argv]


def names(prefix: str) -> dict[str, str]:
    return {r: f"{prefix}{r}" for r in ("c", "a", "b", "r0", "r1", "r2", "r3")}


def build(ns: dict[str, str]) -> None:
    for n in ns.values():
        sh("ip", "netns", "add", n)
    for n in ns.values():
        sh("ip", "-n", n, "link", "set", "lo", "up")
    for k in range(len(CONFIGS)):
        r = ns[f"r{k}"]
        for end, net in (("c", 78), ("a", 79), ("b", 80)):
            # Made inside the router with the peer placed straight into its namespace: never
            # in the root one, not even for a moment.
            sh("ip", "-n", r, "link", "add", f"v{end}", "type", "veth",
               "peer", "name", f"e{k}", "netns", ns[end])  # fmt: skip
            sh("ip", "-n", r, "addr", "add", f"10.{net}.{k}.1/24", "dev", f"v{end}")
            sh("ip", "-n", r, "link", "set", f"v{end}", "up")
            sh("ip", "-n", ns[end], "addr", "add", f"10.{net}.{k}.2/24", "dev", f"e{k}")
            sh("ip", "-n", ns[end], "link", "set", f"e{k}", "up")
        sh("ip", "-n", ns["c"], "route", "add", f"{vip(k)}/32", "via", f"10.78.{k}.1")
        sh("ip", "-n", ns["a"], "route", "add", f"10.78.{k}.0/24", "via", f"10.79.{k}.1")
        sh("ip", "-n", ns["b"], "route", "add", f"10.78.{k}.0/24", "via", f"10.80.{k}.1")
        sh(*nsx(r, "sysctl", "-qw", "net.ipv4.ip_forward=1"))
    sh(*nsx(ns["c"], "sysctl", "-qw", "net.ipv4.ip_local_port_range=1024 65535"))
    for r in "ab":
        sh(*nsx(ns[r], "sysctl", "-qw", "net.core.somaxconn=4096"))


def other_vip(i: int) -> str:
    return f"10.100.{i // 250}.{i % 250 + 1}"


def fake_backends(i: int, n: int = 10) -> list[str]:
    return [f"10.200.{i % 250}.{b + 10}" for b in range(n)]


def nft_state(k: int, services: int) -> LBState:
    out = [LBService(vip(k), "tcp", VPORT, tuple(Backend(ip, BPORT) for ip in real_backends(k)))]
    for i in range(services - 1):
        bes = tuple(Backend(ip, BPORT) for ip in fake_backends(i))
        out.append(LBService(other_vip(i), "tcp", VPORT, bes))
    return LBState(frozenset(out))


def linear_ruleset(k: int, services: int) -> str:
    """One nat chain, one rule per service, the measured VIP last (worst case, as a service
    late in iptables' KUBE-SERVICES chain). Replaces the table atomically."""
    t = f"inet {LIN_TABLE}"

    def rule(addr: str, backends: list[str]) -> str:
        m = ", ".join(f"{n} : {ip} . {BPORT}" for n, ip in enumerate(backends))
        return (
            f"add rule {t} pre ip daddr {addr} tcp dport {VPORT} "
            f"dnat ip to numgen random mod {len(backends)} map {{ {m} }}"
        )

    lines = [
        f"add table {t}",
        f"delete table {t}",
        f"add table {t}",
        f"add chain {t} pre {{ type nat hook prerouting priority dstnat; policy accept; }}",
    ]
    lines += [rule(other_vip(i), fake_backends(i)) for i in range(services - 1)]
    lines.append(rule(vip(k), list(real_backends(k))))
    return "\n".join(lines) + "\n"


class Bench:
    def __init__(self, ns: dict[str, str], workers: int, conc: int):
        self.ns = ns
        self.lbs: list[NftBackend] = []
        self.procs: list[subprocess.Popen] = []
        for k, config in enumerate(CONFIGS):
            router = ns[f"r{k}"]
            n = int(config.removeprefix("nft").removeprefix("lin"))
            if config.startswith("nft"):
                lb = NftBackend(netns=router, config=NftConfig(table=NFT_TABLE))
                self.lbs.append(lb)
                lb.full_sync(nft_state(k, n))
            else:
                with tempfile.NamedTemporaryFile("w", suffix=".nft") as f:
                    f.write(linear_ruleset(k, n))
                    f.flush()
                    sh(*nsx(router, "nft", "-f", f.name))
            # conntrack is active in the router once a nat table exists: now its sysctls are.
            for key, value in CT_SYSCTLS.items():
                sh(*nsx(router, "sysctl", "-qw", f"{key}={value}"))
        me = os.path.abspath(__file__)
        for r in "ab":
            self._spawn(nsx(ns[r], sys.executable, me, "--server", str(BPORT)))
        self.workers = [
            self._spawn(nsx(ns["c"], sys.executable, me, "--worker", str(conc)))
            for _ in range(workers)
        ]

    def _spawn(self, argv: list[str]) -> subprocess.Popen:
        p = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.procs.append(p)
        assert p.stdout is not None and p.stdout.readline().strip() == "ready", argv
        return p

    def measure(self, config: str, seconds: float) -> tuple[float, int]:
        """New connections/s to ``config``'s VIP over ``seconds``, all workers at once."""
        for w in self.workers:
            assert w.stdin is not None
            w.stdin.write(f"run {vip(CONFIGS.index(config))} {seconds}\n")
            w.stdin.flush()
        ok = fail = 0
        for w in self.workers:
            assert w.stdout is not None
            r = json.loads(w.stdout.readline())
            ok, fail = ok + r["ok"], fail + r["fail"]
        return ok / seconds, fail

    def latencies(self, n: int) -> dict[str, list[int]]:
        """Per ruleset, the connect() durations (ns) of ``n`` connects per worker, taken in
        turn with the other rulesets'; a failed connect is -1."""
        vips = [vip(k) for k in range(len(CONFIGS))]
        for w in self.workers:
            assert w.stdin is not None
            w.stdin.write(f"lat {n} {' '.join(vips)}\n")
            w.stdin.flush()
        out: dict[str, list[int]] = {c: [] for c in CONFIGS}
        for w in self.workers:
            assert w.stdout is not None
            got = json.loads(w.stdout.readline())
            for k, c in enumerate(CONFIGS):
                out[c] += got[vip(k)]
        return out

    def close(self) -> None:
        for p in self.procs:
            if p.stdin is not None:
                p.stdin.close()
            p.terminate()
        for p in self.procs:
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                p.kill()
        for lb in self.lbs:
            lb.close()


def latency_phase(bench: Bench, rounds: int, connects: int) -> dict:
    """Serial connects taken in turn over the four rulesets: per-connection cost, robust to
    background load. Rates are 1 / median connect() time (one serial client)."""
    samples: dict[str, list[int]] = {c: [] for c in CONFIGS}
    per_round: dict[str, list[float]] = {"nft": [], "lin": []}
    for r in range(rounds):
        got = bench.latencies(connects)
        bad = sum(1 for v in got.values() for x in v if x < 0)
        if bad > 0.01 * sum(len(v) for v in got.values()):
            raise SystemExit(f"latency round {r + 1}: {bad} failed connects (more than 1 %)")
        med = {c: statistics.median(x for x in v if x >= 0) for c, v in got.items()}
        for kind in per_round:  # rate ratio 1000/10 = time ratio 10/1000
            per_round[kind].append(med[f"{kind}10"] / med[f"{kind}1000"])
        for c, v in got.items():
            samples[c] += [x for x in v if x >= 0]
        print(f"latency round {r + 1}: "
              + "  ".join(f"{c} {med[c] / 1000:6.1f} us" for c in CONFIGS), flush=True)  # fmt: skip
    print(f"\nconnect() time, {rounds} rounds x {connects} connects per ruleset per client "
          f"process, in turn: median (p10-p90) -> serial connects/s")  # fmt: skip
    med_all = {}
    for c in CONFIGS:
        q = statistics.quantiles(samples[c], n=10)
        med_all[c] = statistics.median(samples[c])
        print(f"  {c:8s} {med_all[c] / 1000:7.1f} us ({q[0] / 1000:.1f}-{q[-1] / 1000:.1f})"
              f"  -> {1e9 / med_all[c]:8.0f}/s")  # fmt: skip
    ratios = {}
    for kind in per_round:
        ratios[kind] = med_all[f"{kind}10"] / med_all[f"{kind}1000"]
        name = "NftBackend (verdict map)" if kind == "nft" else "linear chain (control)"
        extra_us = (med_all[f"{kind}1000"] - med_all[f"{kind}10"]) / 1000
        rounds_txt = " ".join(f"{x:.3f}" for x in per_round[kind])
        print(f"  {name:26s} rate 1000/10 = {ratios[kind]:.3f} (extra per connection: "
              f"{extra_us:+.1f} us; per round: {rounds_txt})")  # fmt: skip
    return {"latency_medians_ns": med_all, "latency_ratios": ratios, "latency_per_round": per_round}


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=12, help="throughput rounds")
    ap.add_argument("--seconds", type=float, default=0.5, help="per slice")
    ap.add_argument("--workers", type=int, default=2, help="client processes")
    ap.add_argument("--conc", type=int, default=64, help="connects in flight per process")
    ap.add_argument("--lat-rounds", type=int, default=5, help="rounds of serial connects")
    ap.add_argument("--connects", type=int, default=2000, help="per ruleset, round, process")
    ap.add_argument("--json", help="also write every slice and the ratios here")
    ap.add_argument("--server", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.server:
        return serve(a.server)
    if a.worker:
        return worker(a.worker)
    if os.geteuid() != 0:
        sys.exit("run as root (it makes network namespaces)")
    ns = names(f"sntest-{secrets.token_hex(3)}")
    bench: Bench | None = None
    try:
        build(ns)
        bench = Bench(ns, a.workers, a.conc)
        for config in CONFIGS:  # each path works, and a first warm-up
            rate, fail = bench.measure(config, 0.3)
            if rate == 0:
                raise SystemExit(f"{config}: no connection through {config}'s VIP ({fail} failed)")
        runs: dict[str, list[float]] = {c: [] for c in CONFIGS}
        fails = 0
        for r in range(a.rounds):
            order = CONFIGS[r % 4 :] + CONFIGS[: r % 4]
            line = []
            for config in order:
                rate, fail = bench.measure(config, a.seconds)
                fails += fail
                runs[config].append(rate)
                line.append(f"{config} {rate:6.0f}")
            print(f"round {r + 1:2d}: " + "  ".join(line), flush=True)
        total = sum(sum(v) for v in runs.values()) * a.seconds
        if fails > total * 0.01:
            raise SystemExit(f"{fails} failed connects of {total:.0f}: more than 1 %")
        med = {c: statistics.median(v) for c, v in runs.items()}
        print(f"\nnew connections/s, {a.rounds} rounds x 4 slices of {a.seconds:g} s, "
              f"{a.workers} client processes x {a.conc} in flight, {fails} failed connects; "
              "medians (min-max):")  # fmt: skip
        for c in CONFIGS:
            print(f"  {c:8s} {med[c]:9.0f}  ({min(runs[c]):.0f}-{max(runs[c]):.0f})")
        ratios: dict[str, float] = {}
        for kind in ("nft", "lin"):
            per_round = [x / y for x, y in zip(runs[f"{kind}1000"], runs[f"{kind}10"], strict=True)]
            ratios[kind] = med[f"{kind}1000"] / med[f"{kind}10"]
            ratios[f"{kind}_round_median"] = statistics.median(per_round)
            name = "NftBackend (verdict map)" if kind == "nft" else "linear chain (control)"
            quartiles = " ".join(f"{q:.2f}" for q in statistics.quantiles(per_round))
            print(f"  {name:26s} 1000/10 = {ratios[kind]:.3f} (ratio of medians), "
                  f"{ratios[f'{kind}_round_median']:.3f} (median of per-round ratios; "
                  f"quartiles {quartiles})")  # fmt: skip
        lat = latency_phase(bench, a.lat_rounds, a.connects)
        if a.json:
            with open(a.json, "w") as f:
                json.dump(
                    {"args": vars(a), "runs": runs, "medians": med, "ratios": ratios} | lat, f
                )
    finally:
        if bench is not None:
            bench.close()
        for n in ns.values():
            subprocess.run(["ip", "netns", "delete", n], capture_output=True)


if __name__ == "__main__":
    main()
