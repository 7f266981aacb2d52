"""swarmnet's Raft store vs etcd, same machine, same run (DESIGN "Raft store").

Three etcd members on loopback, started exactly as ../shared/pysyncobj/RESULTS.md section 3
starts them (Debian ``etcd-server`` 3.4, client ports 24379-24381, peer ports 24479-24481,
default heartbeat 100 ms / election 1000 ms), against a 3-process cluster of our Store
(bench/raft_cluster.py, fsync on: group commit). Fresh clusters per round for both, the
contenders alternating. Measured:

- sequential durable writes/s from one client: etcd: one keep-alive ``http.client``
  connection to the leader, ``POST /v3/kv/put`` on the HTTP/JSON gateway (base64 key, 8-byte
  value), as RESULTS did; ours: one write at a time through ``Store.submit`` inside the
  leader process (``create_network``: a /24 and a VNI from the replicated IPAM);
- pipelined writes/s with ``--inflight`` (16) in flight: etcd: that many threads, each with
  its own keep-alive connection; ours: that many outstanding ``Store.submit`` calls;
- leader failover: SIGKILL the leader; each survivor starts one write every 50 ms, each in
  its own thread whether or not the previous one answered, like RESULTS T3 (etcd: a put on
  its own connection, 5 s timeout; ours: bench/raft_failover.py, 2 s timeout); the figure
  is kill -> the first acknowledged write that started after the kill. The killed member is
  restarted on its data dir and caught up before the next kill.

Goals: sequential >= 0.8x etcd, pipelined >= 1x etcd, failover median <= etcd's.
Only processes this script started are signalled; its temporary directories are removed.

    apt-get install -y etcd-server etcd-client     # if missing (Debian bookworm: 3.4.23)
    .venv/bin/python bench/raft_etcd.py [--rounds 3] [--kills 10] [--json out.json] [--baseline]
"""

from __future__ import annotations

import argparse
import base64
import http.client
import json
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from raft_cluster import Cluster  # noqa: E402
from raft_failover import every_50ms, run_failover  # noqa: E402

HOST = "127.0.0.1"
CLIENT_PORTS = [24379, 24380, 24381]
PEER_PORTS = [24479, 24480, 24481]


class Etcd:
    """Three etcd members, flags exactly as RESULTS section 3 (default timings)."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="snetcd-"))
        self.procs: list[subprocess.Popen | None] = [None] * 3
        self.cluster = ",".join(f"e{i}=http://{HOST}:{p}" for i, p in enumerate(PEER_PORTS))

    def start(self, i: int) -> None:
        c, p = CLIENT_PORTS[i], PEER_PORTS[i]
        argv = [
            "etcd", "--name", f"e{i}", "--data-dir", str(self.dir / f"e{i}"),
            "--listen-client-urls", f"http://{HOST}:{c}",
            "--advertise-client-urls", f"http://{HOST}:{c}",
            "--listen-peer-urls", f"http://{HOST}:{p}",
            "--initial-advertise-peer-urls", f"http://{HOST}:{p}",
            "--initial-cluster", self.cluster, "--initial-cluster-token", "anchor-raft",
            "--initial-cluster-state", "new", "--logger", "zap", "--log-level", "warn",
        ]  # fmt: skip
        log = open(self.dir / f"e{i}.log", "ab")
        self.procs[i] = subprocess.Popen(argv, stdout=log, stderr=log)

    def start_all(self) -> None:
        for i in range(3):
            self.start(i)
        self.leader(timeout_s=60)

    def kill(self, i: int) -> None:
        p = self.procs[i]
        if p is not None and p.poll() is None:
            p.send_signal(signal.SIGKILL)
            p.wait()
        self.procs[i] = None

    def close(self) -> None:
        for i in range(3):
            self.kill(i)
        shutil.rmtree(self.dir, ignore_errors=True)

    def alive(self) -> list[int]:
        return [i for i, p in enumerate(self.procs) if p is not None and p.poll() is None]

    def status(self, i: int, timeout: float = 1.0) -> dict | None:
        try:
            return post(HOST, CLIENT_PORTS[i], "/v3/maintenance/status", {}, timeout)
        except (OSError, http.client.HTTPException, ValueError):
            return None

    def leader(self, timeout_s: float = 30.0) -> int:
        """The member whose status says it is the leader (leader == header.member_id)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for i in self.alive():
                st = self.status(i)
                if st and st.get("leader") and st["leader"] == st["header"]["member_id"]:
                    return i
            time.sleep(0.02)
        raise TimeoutError("etcd: no leader")


def post(host: str, port: int, path: str, body: dict, timeout: float) -> dict:
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        return request(conn, path, body)
    finally:
        conn.close()


def request(conn: http.client.HTTPConnection, path: str, body: dict) -> dict:
    conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
    resp = conn.getresponse()
    data = resp.read()
    if resp.status != 200:
        raise http.client.HTTPException(f"{path}: HTTP {resp.status} {data[:200]!r}")
    return json.loads(data)


def b64(s: str) -> str:
    return base64.b64encode(s.encode()).decode()


VALUE = b64("x" * 8)


def etcd_put(conn: http.client.HTTPConnection, key: str) -> None:
    request(conn, "/v3/kv/put", {"key": b64(key), "value": VALUE})


def etcd_rate(e: Etcd, n: int, inflight: int, prefix: str) -> float:
    """n puts to the leader from ``inflight`` threads, each with its own keep-alive
    connection (1 = the sequential client). Returns puts/s."""
    port = CLIENT_PORTS[e.leader()]
    per = [n // inflight + (1 if k < n % inflight else 0) for k in range(inflight)]
    conns = [http.client.HTTPConnection(HOST, port, timeout=10) for _ in range(inflight)]
    for k, conn in enumerate(conns):  # warm the connections (and the code path)
        etcd_put(conn, f"{prefix}warm{k}")
    errors: list[BaseException] = []
    barrier = threading.Barrier(inflight + 1)

    def client(k: int) -> None:
        barrier.wait()
        try:
            for j in range(per[k]):
                etcd_put(conns[k], f"{prefix}{k}-{j}")
        except BaseException as ex:  # reported below; the figure is then invalid
            errors.append(ex)

    threads = [threading.Thread(target=client, args=(k,)) for k in range(inflight)]
    for t in threads:
        t.start()
    barrier.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t0
    for conn in conns:
        conn.close()
    if errors:
        raise RuntimeError(f"etcd puts failed: {errors[0]!r}")
    return n / elapsed


def store_rate(c: Cluster, n: int, inflight: int, prefix: str) -> float:
    leader = c.leader()
    _, r = c.call(leader, "/bench", {"n": n, "window": inflight, "prefix": prefix}, timeout=600)
    if r["failures"]:
        raise RuntimeError(f"store: {r['failures']} failed writes")
    return r["n"] / r["elapsed"]


def throughput_round(rnd: int, args: argparse.Namespace, extra: tuple[str, ...]) -> dict:
    out: dict[str, float] = {}
    order = ["etcd", "store"] if rnd % 2 == 0 else ["store", "etcd"]
    for who in order:
        if who == "etcd":
            e = Etcd()
            try:
                e.start_all()
                etcd_rate(e, 200, 16, "w")  # warm-up, like the store's below
                out["etcd_seq"] = etcd_rate(e, args.seq_n, 1, "s")
                out["etcd_pipe"] = etcd_rate(e, args.n, args.inflight, "p")
            finally:
                e.close()
        else:
            c = Cluster(n=3, mode="store", fsync=True, first_host=81, extra_args=extra)
            try:
                c.start_all()
                c.init()
                store_rate(c, 200, 16, "w")
                out["store_seq"] = store_rate(c, args.seq_n, 1, "s")
                out["store_pipe"] = store_rate(c, args.n, args.inflight, "p")
            finally:
                c.close()
    print(
        f"round {rnd}: sequential etcd {out['etcd_seq']:6.0f}/s store {out['store_seq']:6.0f}/s"
        f" ({out['store_seq'] / out['etcd_seq']:.2f}x) | {args.inflight} in flight: etcd "
        f"{out['etcd_pipe']:6.0f}/s store {out['store_pipe']:6.0f}/s "
        f"({out['store_pipe'] / out['etcd_pipe']:.2f}x)",
        flush=True,
    )
    return out


def etcd_failover(kills: int) -> dict:
    e = Etcd()
    failover: list[float] = []
    catchup: list[float] = []
    acked: list[str] = []
    seq = iter(range(10**9))
    try:
        e.start_all()
        for k in range(kills):
            leader = e.leader()
            post(
                HOST, CLIENT_PORTS[leader], "/v3/kv/put", {"key": b64(f"pre{k}"), "value": VALUE}, 5
            )
            t0 = time.monotonic()
            e.kill(leader)
            first: list[float] = []
            done = threading.Event()

            def one(i: int, t0: float = t0, done=done, first=first) -> None:
                start = time.monotonic()
                key = f"w{next(seq)}"
                try:
                    post(HOST, CLIENT_PORTS[i], "/v3/kv/put", {"key": b64(key), "value": VALUE}, 5)
                except (OSError, http.client.HTTPException, ValueError):
                    return
                acked.append(key)
                if start >= t0:
                    first.append(time.monotonic() - t0)
                    done.set()

            every_50ms(e.alive(), one, done)
            failover.append(min(first))
            t1 = time.monotonic()
            e.start(leader)
            new = e.leader()
            while True:  # caught up: its applied index reached the leader's
                a, b = e.status(leader), e.status(new)
                if a and b and int(a["raftAppliedIndex"]) >= int(b["raftIndex"]) - 1:
                    break
                time.sleep(0.02)
            catchup.append(time.monotonic() - t1)
            print(
                f"  etcd  kill {k + 1:2d}: failover {failover[-1]:.2f} s, "
                f"catch-up {catchup[-1]:.2f} s",
                flush=True,
            )
        # every acknowledged key is there (a range read on the leader, like RESULTS)
        leader = e.leader()
        conn = http.client.HTTPConnection(HOST, CLIENT_PORTS[leader], timeout=10)
        r = request(
            conn, "/v3/kv/range", {"key": b64("w"), "range_end": b64("x"), "keys_only": True}
        )
        conn.close()
        have = {base64.b64decode(kv["key"]).decode() for kv in r.get("kvs", [])}
        return {
            "failover": failover,
            "catchup": catchup,
            "acked": len(acked),
            "missing": len(set(acked) - have),
        }
    finally:
        e.close()


def summary(xs: list[float]) -> str:
    return f"median {statistics.median(xs):.2f} s, max {max(xs):.2f} s, min {min(xs):.2f} s"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seq-n", type=int, default=500)
    ap.add_argument("--n", type=int, default=3000, help="pipelined writes per contender")
    ap.add_argument("--inflight", type=int, default=16)
    ap.add_argument("--kills", type=int, default=10)
    ap.add_argument(
        "--name-index",
        action="store_true",
        help="experiment: O(1) network_by_name in our nodes (bench/raft_node.py)",
    )
    ap.add_argument(
        "--baseline",
        action="store_true",
        help="our nodes without the 26-11 14:10 changes (no AppendEntries hold or merging)",
    )
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    if shutil.which("etcd") is None:
        print("etcd not found: apt-get install -y etcd-server etcd-client", file=sys.stderr)
        return 2
    version = subprocess.run(["etcd", "--version"], capture_output=True, text=True).stdout
    print(version.splitlines()[0] if version else "etcd ?", flush=True)
    extra: tuple[str, ...] = ("--name-index",) if args.name_index else ()
    if args.baseline:
        extra += ("--ae-hold-us", "0", "--no-coalesce")
    rounds = [throughput_round(r, args, extra) for r in range(args.rounds)]
    res: dict[str, Any] = {"rounds": rounds}
    if args.kills:
        print("failover (SIGKILL of the leader):", flush=True)
        fo = {"etcd": etcd_failover(args.kills), "store": run_failover(args.kills, True, extra)}
        res["failover"] = fo
    med = {k: statistics.median(r[k] for r in rounds) for k in rounds[0]}
    seq_ratio = statistics.median(r["store_seq"] / r["etcd_seq"] for r in rounds)
    pipe_ratio = statistics.median(r["store_pipe"] / r["etcd_pipe"] for r in rounds)
    print("\nmedians over rounds:")
    print(
        f"  sequential: etcd {med['etcd_seq']:.0f}/s, store {med['store_seq']:.0f}/s, "
        f"store/etcd {seq_ratio:.2f} (median of per-round ratios; goal >= 0.8)"
    )
    print(
        f"  {args.inflight} in flight: etcd {med['etcd_pipe']:.0f}/s, store "
        f"{med['store_pipe']:.0f}/s, store/etcd {pipe_ratio:.2f} (goal >= 1.0)"
    )
    ok = seq_ratio >= 0.8 and pipe_ratio >= 1.0
    if args.kills:
        for who in ("etcd", "store"):
            f = res["failover"][who]
            print(
                f"  failover {who:5s} n={len(f['failover'])}: {summary(f['failover'])}; "
                f"catch-up {summary(f['catchup'])}; acked {f['acked']}, missing {f['missing']}"
            )
        fe = statistics.median(res["failover"]["etcd"]["failover"])
        fs = statistics.median(res["failover"]["store"]["failover"])
        print(f"  failover median store/etcd {fs / fe:.2f} (goal <= 1.0)")
        ok = ok and fs <= fe
    res.update(medians=med, seq_ratio=seq_ratio, pipe_ratio=pipe_ratio)
    if args.json:
        args.json.write_text(json.dumps(res, indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
