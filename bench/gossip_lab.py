"""Gossip figures in a 5-host netns lab, ours and Debian's serf side by side in ONE run
(issue 5, "Figures"; needs root and the ``serf`` package).

The lab: 5 hosts (network namespaces on one underlay bridge), a swarmnet agent on each
(gossip on IP:7946), and a serf agent on each (IP:7947, default LAN settings, RPC on the
namespace's own 127.0.0.1:7373). Every serf agent runs one event handler that appends
``<unix time> <event> <payload or names>`` to a file. Everything is stamped with the
wall clock of the one machine, so stamps from different hosts compare directly.

1. Propagation. Ours: "task up on one host -> FDB/neighbours programmed on every other
   host". A service on one overlay network has a task on every host; we scale it up one task
   at a time. t0 = the owner's log line ``gossip: published endpoint`` (written when the
   worker hands the entry to NetworkDB, before the gossip goes out); t1 on each other host =
   its ``gossip: programmed endpoint ... done=`` (written after the worker's reconciler has
   applied the kernel ops: FDB + neighbour entries in place). Serf: ``serf event -coalesce=
   false`` on one host; t0 = the origin's own handler stamp, t1 = each other host's handler
   stamp (handler start costs both sides the same fork/exec). Per event we take the LAST of
   the other 4 hosts (reached everywhere), and report p50/p99 of those.
2. Detection. SIGKILL the agent of h5 (ours: the swarmnet agent, its tasks keep running;
   serf: the serf agent), time until EVERY other host reports it failed (ours: the agents'
   ``gossip: member-failed`` lines; serf: the handler's ``member-failed`` events).
3. False deaths. nftables in the underlay namespace drops ``--loss`` % of the bridged frames
   at random (``numgen random mod 100 < loss``) for ``--window`` seconds; both pools run
   through the same window; count member-failed reports of nodes that never died.

    sudo .venv/bin/python bench/gossip_lab.py [--tasks 40] [--kills 5] [--window 120]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from swarmnet.api.client import Client  # noqa: E402
from swarmnet.lab import netns  # noqa: E402
from swarmnet.lab.netns import LabConfig  # noqa: E402

SWARMNET = [sys.executable, "-m", "swarmnet"]
SERF_PORT = 7947
HANDLER = """#!/bin/sh
t=$(date +%s.%N)
p=$(cat)
echo "$t $SERF_EVENT $SERF_USER_EVENT $p" | tr '\\n' ' ' >> "$1"
echo >> "$1"
"""


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    if not xs:
        return float("nan")
    k = min(len(xs) - 1, max(0, round(p / 100 * (len(xs) - 1))))
    return xs[k]


def fmt(xs: list[float], unit: float = 1000.0, suffix: str = "ms") -> str:
    if not xs:
        return "n/a"
    d = 0 if unit > 1 else 2

    def v(x: float) -> str:
        return f"{x * unit:.{d}f}"

    return (
        f"p50 {v(pct(xs, 50))} {suffix}, p90 {v(pct(xs, 90))}, "
        f"p99 {v(pct(xs, 99))}, max {v(max(xs))} (n={len(xs)})"
    )


class Bench:
    def __init__(self, name: str, hosts: int):
        self.name = name
        self.hosts = [f"h{i}" for i in range(1, hosts + 1)]
        self.cfg = LabConfig(name=name, hosts=hosts)
        self.dir = netns.lab_dir(name)
        self.serf: dict[str, subprocess.Popen] = {}
        self.measured: list[str] = []  # the endpoint keys propagation_ours timed

    # ---- helpers ----------------------------------------------------------------------
    def ip(self, h: str) -> str:
        return self.cfg.host_ip(int(h[1:]))

    def on(self, h: str, argv: list[str], **kw) -> subprocess.CompletedProcess:
        cmd, env = netns.exec_argv(self.name, h, argv)
        return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120, **kw)

    def cli(self, *args: str) -> None:
        r = subprocess.run(
            [*SWARMNET, "--lab", self.name, *args], capture_output=True, text=True, timeout=120
        )
        if r.returncode != 0:
            raise SystemExit(f"swarmnet {' '.join(args)}: {r.stderr}{r.stdout}")

    def log(self, h: str) -> str:
        return (self.dir / h / "agent.log").read_text(errors="replace")

    def gossip(self, h: str) -> dict:
        return Client(host=netns.host_api(self.name, h), timeout_s=10).get("/swarmnet/gossip")

    def wait(self, fn, what: str, timeout_s: float = 90.0):
        deadline = time.monotonic() + timeout_s
        while True:
            v = fn()
            if v:
                return v
            if time.monotonic() > deadline:
                raise SystemExit(f"timed out waiting for {what}")
            time.sleep(0.1)

    def node_ids(self) -> dict[str, str]:
        nodes = Client(host=netns.host_api(self.name, "h1")).get("/nodes")
        return {n["Description"]["Hostname"]: n["ID"] for n in nodes}

    # ---- serf ---------------------------------------------------------------------------
    def serf_file(self, h: str) -> Path:
        return self.dir / f"serf-{h}.events"

    def start_serf(self, h: str) -> None:
        handler = self.dir / "serf-handler.sh"
        handler.write_text(HANDLER)
        handler.chmod(0o755)
        self.serf_file(h).touch()
        cmd, env = netns.exec_argv(
            self.name,
            h,
            [
                "serf",
                "agent",
                "-node",
                f"s{h}",
                "-bind",
                f"{self.ip(h)}:{SERF_PORT}",
                "-rpc-addr",
                "127.0.0.1:7373",
                "-event-handler",
                f"{handler} {self.serf_file(h)}",
            ],
        )
        log = open(self.dir / f"serf-{h}.log", "ab")  # noqa: SIM115 - kept for the process
        self.serf[h] = subprocess.Popen(cmd, env=env, stdout=log, stderr=log)

    def serf_events(self, h: str) -> list[tuple[float, str, str]]:
        out = []
        for line in self.serf_file(h).read_text().splitlines():
            parts = line.split(None, 3)
            if len(parts) >= 2:
                out.append((float(parts[0]), parts[1], " ".join(parts[2:])))
        return out

    def serf_up(self) -> None:
        for h in self.hosts:
            self.start_serf(h)
        time.sleep(1.0)
        for h in self.hosts[1:]:
            self.wait(
                lambda h=h: (
                    self.on(
                        h, ["serf", "join", "-rpc-addr", "127.0.0.1:7373", f"{self.ip('h1')}:7947"]
                    ).returncode
                    == 0
                ),
                f"serf on {h} to join",
            )

    # ---- the measurements --------------------------------------------------------------
    def propagation_ours(self, n: int) -> list[float]:
        self.cli("network", "create", "-d", "overlay", "bench")
        hosts = len(self.hosts)
        self.cli(
            "service", "create", "--name", "pb", "--replicas", str(hosts), "--network", "bench",
            "--", "sleep", "100000",
        )  # fmt: skip
        self.wait(lambda: self._published() >= hosts, "one task per host", 120)
        time.sleep(2.0)  # let every host program the initial five
        results = []
        for i in range(n):
            before = self._published()
            self.cli("service", "scale", f"pb={hosts + i + 1}")
            self.wait(lambda b=before: self._published() > b, "the new task to be published")
            key, owner, t0 = self._last_published()
            self.measured.append(key)
            others = [h for h in self.hosts if h != owner]
            t1s = self.wait(
                lambda k=key, o=others: self._programmed(k, o), f"{key} programmed everywhere", 30
            )
            results.append(max(t1s) - t0)
        return results

    _PUB = re.compile(r"gossip: published endpoint (\S+) t=([0-9.]+)")
    _PROG = re.compile(r"gossip: programmed endpoint (\S+) seen=[0-9.]+ done=([0-9.]+)")
    _SEEN = re.compile(r"gossip: programmed endpoint (\S+) seen=([0-9.]+) done=([0-9.]+)")
    # The workers' own timings (swarmnet/worker.py): "(name value name value ... ms)".
    _FAST = re.compile(r"overlay fast path: applied \d+ FDB/neighbour ops \(([^)]*) ms\)")
    _SYNC = re.compile(r"overlay: sync timings \(([^)]*) ms\) full=(\d)")

    def breakdown(self) -> list[str]:
        """Where propagation time goes, from the receiving hosts' logs: per measured endpoint
        (the ones ``propagation_ours`` timed) the LAST host's gossip part (owner's publish
        -> table event there) and local part (table event -> kernel programmed), and the
        workers' fast-path and sync phase timings over every host (a sync's "kernel" is a full pass or, when only remote
        endpoints changed, their delta)."""
        pub: dict[str, float] = {}
        seen: dict[str, list[tuple[float, float]]] = {}
        fast: dict[str, list[float]] = {}
        sync: dict[str, list[float]] = {}
        full_passes = 0
        for h in self.hosts:
            text = self.log(h)
            for key, t in self._PUB.findall(text):
                pub.setdefault(key, float(t))  # the first publish: the task's "up"
            first: dict[str, tuple[float, float]] = {}
            for key, t_seen, t_done in self._SEEN.findall(text):
                first.setdefault(key, (float(t_seen), float(t_done)))  # see _programmed
            for key, hit in first.items():
                seen.setdefault(key, []).append(hit)
            bodies = [(b, fast) for b in self._FAST.findall(text)]
            for b, full in self._SYNC.findall(text):
                bodies.append((b, sync))
                full_passes += int(full)
            for body, out in bodies:
                words = body.split()
                for name, v in zip(words[::2], words[1::2], strict=False):
                    out.setdefault(name, []).append(float(v) / 1000)
        gossip, local = [], []
        for key, t0 in pub.items():
            hits = seen.get(key) or []
            if key not in self.measured or len(hits) < len(self.hosts) - 1:
                continue  # an initial endpoint (published before its network was joined)
            t_seen, t_done = max(hits, key=lambda x: x[1])
            gossip.append(t_seen - t0)
            local.append(t_done - t_seen)
        lines = [
            f"  last host, publish -> table event: {fmt(gossip)}",
            f"  last host, table event -> programmed: {fmt(local)}",
        ]
        lines += [f"  fast path {k}: {fmt(v)}" for k, v in fast.items()]
        lines += [f"  sync {k}: {fmt(v)}" for k, v in sync.items()]
        n_sync = len(sync.get("total", []))
        lines.append(f"  syncs: {n_sync}, of which full passes: {full_passes} (all hosts)")
        return lines

    def _published(self) -> int:
        return sum(len(self._PUB.findall(self.log(h))) for h in self.hosts)

    def _last_published(self) -> tuple[str, str, float]:
        """The newest key, its owner and its FIRST publish (an owner may publish a key
        again, e.g. after withdrawing it: t0 is when the task first went up)."""
        first: dict[str, tuple[str, float]] = {}
        for h in self.hosts:
            for key, t in self._PUB.findall(self.log(h)):
                first.setdefault(key, (h, float(t)))
        key, (h, t) = max(first.items(), key=lambda kv: kv[1][1])
        return key, h, t

    def _programmed(self, key: str, hosts: list[str]) -> list[float] | None:
        """Each host's FIRST programmed stamp of ``key`` (the one the first publish
        caused; a later one would belong to a re-publish)."""
        out = []
        for h in hosts:
            done = [float(t) for k, t in self._PROG.findall(self.log(h)) if k == key]
            if not done:
                return None
            out.append(done[0])
        return out

    def propagation_serf(self, n: int) -> list[float]:
        results = []
        for i in range(n):
            tag = f"b{i}-{secrets.token_hex(3)}"
            origin = self.hosts[i % len(self.hosts)]
            self.on(
                origin,
                ["serf", "event", "-rpc-addr", "127.0.0.1:7373", "-coalesce=false", "bench", tag],
            )

            def got(tag=tag, origin=origin):
                ts = {}
                for h in self.hosts:
                    hit = [t for t, ev, rest in self.serf_events(h) if ev == "user" and tag in rest]
                    if not hit:
                        return None
                    ts[h] = hit[0]
                return ts

            ts = self.wait(got, f"serf event {tag} everywhere", 60)
            t0 = ts.pop(origin)
            results.append(max(ts.values()) - t0)
            time.sleep(0.3 + 0.2 * (i % 3))  # events not in lockstep with the gossip tick
        return results

    def detection_ours(self, victim: str, kills: int) -> list[float]:
        ids = self.node_ids()
        vid = ids[victim]
        others = [h for h in self.hosts if h != victim]
        pat = re.compile(rf"gossip: member-failed {vid} \S+ t=([0-9.]+)")
        out = []
        for _ in range(kills):
            n_before = {h: len(pat.findall(self.log(h))) for h in others}
            pid = next(x["pid"] for x in netns.status(self.name)["hosts"] if x["host"] == victim)
            t0 = time.time()
            os.kill(pid, signal.SIGKILL)

            def seen(n_before=n_before):
                ts = []
                for h in others:
                    hits = pat.findall(self.log(h))
                    if len(hits) <= n_before[h]:
                        return None
                    ts.append(float(hits[n_before[h]]))
                return ts

            ts = self.wait(seen, f"{victim} failed everywhere (ours)", 60)
            out.append(max(ts) - t0)
            netns.start(self.name, victim)
            self.wait(
                lambda: all(
                    any(
                        m["name"] == vid and m["state"] == "ALIVE"
                        for m in self.gossip(h)["members"]
                    )
                    for h in others
                ),
                f"{victim} alive again (ours)",
            )
            time.sleep(2.0)
        return out

    def detection_serf(self, victim: str, kills: int) -> list[float]:
        others = [h for h in self.hosts if h != victim]
        out = []
        for _ in range(kills):
            n_before = {h: len(self._serf_failed(h, victim)) for h in others}
            t0 = time.time()
            self.serf[victim].kill()
            self.serf[victim].wait()

            def seen(n_before=n_before):
                ts = []
                for h in others:
                    hits = self._serf_failed(h, victim)
                    if len(hits) <= n_before[h]:
                        return None
                    ts.append(hits[n_before[h]])
                return ts

            ts = self.wait(seen, f"s{victim} failed everywhere (serf)", 60)
            out.append(max(ts) - t0)
            self.start_serf(victim)
            time.sleep(1.0)
            self.wait(
                lambda: (
                    self.on(
                        victim,
                        ["serf", "join", "-rpc-addr", "127.0.0.1:7373", f"{self.ip('h1')}:7947"],
                    ).returncode
                    == 0
                ),
                "serf rejoin",
            )
            time.sleep(2.0)
        return out

    def _serf_failed(self, h: str, victim: str) -> list[float]:
        return [
            t
            for t, ev, rest in self.serf_events(h)
            if ev == "member-failed" and f"s{victim}" in rest
        ]

    def false_deaths(self, loss: int, window_s: float) -> tuple[int, int]:
        ul = netns.underlay_ns(self.name)
        ours_before = sum(self.log(h).count("gossip: member-failed") for h in self.hosts)
        serf_before = sum(
            sum(1 for _t, ev, _r in self.serf_events(h) if ev == "member-failed")
            for h in self.hosts
        )
        rules = (
            "table bridge snbench {\n chain lossy {\n  type filter hook forward priority 0;\n"
            f"  numgen random mod 100 < {loss} drop\n }}\n}}\n"
        )
        subprocess.run(
            ["ip", "netns", "exec", ul, "nft", "-f", "-"], input=rules, text=True, check=True
        )
        try:
            time.sleep(window_s)
        finally:
            subprocess.run(["ip", "netns", "exec", ul, "nft", "delete table bridge snbench"])
        ours = sum(self.log(h).count("gossip: member-failed") for h in self.hosts) - ours_before
        serf = (
            sum(
                sum(1 for _t, ev, _r in self.serf_events(h) if ev == "member-failed")
                for h in self.hosts
            )
            - serf_before
        )
        return ours, serf

    def close(self, keep: str | None = None) -> None:
        if keep:  # the agents' logs, before the lab (and its directory) goes
            out = Path(keep)
            out.mkdir(parents=True, exist_ok=True)
            for h in self.hosts:
                with contextlib.suppress(OSError):
                    shutil.copy(self.dir / h / "agent.log", out / f"{h}.log")
        for p in self.serf.values():
            if p.poll() is None:
                p.kill()
                p.wait()
        netns.down(self.name)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hosts", type=int, default=5)
    ap.add_argument("--tasks", type=int, default=40, help="endpoints / serf events measured")
    ap.add_argument("--kills", type=int, default=5, help="SIGKILLs of each agent")
    ap.add_argument("--window", type=float, default=120.0, help="loss window, seconds")
    ap.add_argument("--loss", type=int, default=10, help="underlay frame loss, percent")
    ap.add_argument("--json", help="also write the raw figures here")
    ap.add_argument("--keep-logs", help="copy the agents' logs into this directory")
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("needs root (network namespaces)")
    name = f"b{secrets.token_hex(3)}"
    b = Bench(name, args.hosts)
    netns.up(b.cfg)
    try:
        b.serf_up()
        victim = b.hosts[-1]
        print(f"lab {name}: {args.hosts} hosts, swarmnet agents + serf agents", flush=True)
        ours_p = b.propagation_ours(args.tasks)
        print("propagation, ours:", fmt(ours_p), flush=True)
        print("\n".join(b.breakdown()), flush=True)
        serf_p = b.propagation_serf(args.tasks)
        print("propagation, serf:", fmt(serf_p), flush=True)
        ours_d = b.detection_ours(victim, args.kills)
        print("detection, ours:", fmt(ours_d, 1, "s"), flush=True)
        serf_d = b.detection_serf(victim, args.kills)
        print("detection, serf:", fmt(serf_d, 1, "s"), flush=True)
        ours_f, serf_f = b.false_deaths(args.loss, args.window)
    finally:
        b.close(args.keep_logs)
    print()
    print(f"{'':34} {'swarmnet':58} serf")
    print(f"{'propagation to all other hosts':34} {fmt(ours_p):58} {fmt(serf_p)}")
    print(f"{'SIGKILL -> failed on all others':34} {fmt(ours_d, 1, 's'):58} {fmt(serf_d, 1, 's')}")
    print(f"{f'false deaths, {args.loss}% loss, {args.window:.0f} s':34} {ours_f!s:58} {serf_f}")
    goals = {
        "propagation p99 <= serf p99 / 2": pct(ours_p, 99) <= pct(serf_p, 99) / 2,
        "detection p50 <= serf p50": pct(ours_d, 50) <= pct(serf_d, 50),
        "zero false deaths": ours_f == 0,
    }
    for g, ok in goals.items():
        print(f"goal: {g}: {'MET' if ok else 'NOT MET'}")
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "ours": {"prop": ours_p, "detect": ours_d, "false": ours_f},
                    "serf": {"prop": serf_p, "detect": serf_d, "false": serf_f},
                }  # fmt: skip
            )
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
