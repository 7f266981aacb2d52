"""One Raft node process for the Raft benchmarks and the SIGKILL durability test.

``--mode store``: swarmnet's Store (ClusterState behind pysyncobj, group-commit journal);
``--mode raw``: a bare pysyncobj ReplCounter with the same SyncObjConf (journal + dump,
appendEntriesUseBatch=False) and an asyncio bridge, so the two differ in what a command does
and in our layer; ``--mode raw-state``: the same bare pysyncobj running the Store's
ClusterState.apply on the same commands, so the two differ only in our layer. A tiny HTTP control server (aiohttp, 127.0.0.1:--ctl) drives it:

- ``GET  /status``           role, leader, term, index, the set of network names
- ``POST /init``             commit the cluster record (store mode, once, on the leader)
- ``POST /write``            {"name": N}: create network N (raw: increment); 200 = acknowledged
- ``POST /bench``            {"n": N, "window": W, "prefix": P}: N pipelined writes, W outstanding,
  issued from inside this process (how a manager issues them); returns the elapsed time
- ``GET  /trace``            with ``--trace`` only: the per-step timestamps recorded since the
  last call (submit, journal add, sync, sends, receives, commit, callback, resolved), from
  which docs/raft.md's latency breakdown of one write was computed
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import threading
import time
from pathlib import Path
from typing import Any

from aiohttp import web

from swarmnet.raft.store import RaftConfig, Store, StoreError

CLUSTER_INIT = {
    "op": "init",
    "cluster_id": "benchcluster",
    "tokens": {"worker": "w" * 25, "manager": "m" * 25},
    "digest": "d" * 50,
    "pools": None,
    "subnet_size": None,
    "now": "2026-01-01T00:00:00.000000Z",
    "node": {
        "node_id": "benchnode",
        "hostname": "bench",
        "addr": "127.0.0.1",
        "role": "manager",
        "secret_hash": "x",
    },
}


def network_cmd(name: str) -> dict:
    # The id is the name: a retried write after an unknown outcome is a no-op (idempotent).
    return {"op": "create_network", "id": name, "name": name, "now": "2026-01-01T00:00:00Z"}


def _state_consumer() -> Any:
    """A bare pysyncobj consumer doing the Store's state-machine work: the same
    ClusterState.apply of the same command dict (so the same IPAM allocations), with none of
    the Store around it (no msgpack, lock, group commit, batched delivery)."""
    from pysyncobj import SyncObjConsumer, replicated

    from swarmnet.raft.state import ClusterState

    class RawState(SyncObjConsumer):
        def __init__(self) -> None:
            super().__init__()
            self.state = ClusterState()

        @replicated
        def apply(self, cmd: dict) -> dict:
            return self.state.apply(cmd)

    return RawState()


def index_network_names() -> None:
    """EXPERIMENT (``--name-index``), not what swarmnet ships: give ClusterState a
    name -> id index so that ``network_by_name`` is O(1), to measure what that change in
    swarmnet/raft/state.py would buy (its linear scan over every network is the largest
    single cost of create_network once thousands of networks exist). The index is exact:
    networks are only ever added by ``_cmd_create_network`` (wrapped here), and a removed
    one is caught by checking the name of the network an entry points at."""
    from swarmnet.raft.state import ClusterState

    create = ClusterState._cmd_create_network

    def index(self: Any) -> dict[str, str]:
        idx = self.__dict__.get("_bench_names")
        if idx is None:
            idx = {n["name"]: nid for nid, n in self.networks.items()}
            self.__dict__["_bench_names"] = idx
        return idx

    def network_by_name(self: Any, name: str) -> dict | None:
        net = self.networks.get(index(self).get(name, ""))
        return net if net is not None and net["name"] == name else None

    def create_network(self: Any, cmd: dict) -> dict:
        result = create(self, cmd)
        net = self.networks.get(cmd["id"])
        if net is not None:
            index(self)[net["name"]] = cmd["id"]
        return result

    ClusterState.network_by_name = network_by_name  # type: ignore[method-assign]
    ClusterState._cmd_create_network = create_network  # type: ignore[method-assign]


TRACE: list[tuple[float, str, Any]] = []


def install_trace() -> None:
    """Instrumentation (``--trace``, off by default): timestamps (perf_counter = CLOCK_MONOTONIC,
    comparable across the node processes) of each step of a write, read by GET /trace."""
    from pysyncobj import tcp_connection, transport
    from pysyncobj.syncobj import SyncObj

    from swarmnet.raft import journal as jr
    from swarmnet.raft import store as st

    now = time.perf_counter
    ev = TRACE.append

    def wrap(cls: Any, name: str, before: Any = None, after: Any = None) -> None:
        orig = getattr(cls, name)

        def f(self: Any, *a: Any, **k: Any) -> Any:
            if before:
                before(self, *a)
            r = orig(self, *a, **k)
            if after:
                after(self, r, *a)
            return r

        setattr(cls, name, f)

    wrap(jr.DurableJournal, "add", after=lambda s, r, c, i, t: ev((now(), "add", i)))
    orig_sync = jr.DurableJournal.sync

    def sync(self: Any) -> bool:
        t0 = now()
        r = orig_sync(self)
        if r:
            ev((t0, "sync0", None))
            ev((now(), "sync1", None))
        return r

    jr.DurableJournal.sync = sync  # type: ignore[method-assign]
    wrap(
        jr.DurableJournal,
        "setRaftCommitIndex",
        after=lambda s, r, i: ev((now(), "commit", i)),
    )

    def before_send(self: Any, msg: Any) -> None:
        ev((now(), "enc0", None))

    def after_send(self: Any, r: Any, msg: Any) -> None:
        m = msg[1] if isinstance(msg, tuple) else msg
        if isinstance(m, dict):
            ev((now(), "sent", m.get("type")))

    wrap(tcp_connection.TcpConnection, "send", before_send, after_send)
    wrap(
        transport.TCPTransport,
        "_onMessageReceived",
        before=lambda s, n, m: ev((now(), "recv", m.get("type") if isinstance(m, dict) else "?")),
    )
    from pysyncobj import poller as pl

    wrap(
        pl.SelectPoller,
        "poll",
        before=lambda s, *a: ev((now(), "poll0", None)),
        after=lambda s, r, *a: ev((now(), "poll1", None)),
    )
    if hasattr(pl, "PollPoller"):
        wrap(
            pl.PollPoller,
            "poll",
            before=lambda s, *a: ev((now(), "poll0", None)),
            after=lambda s, r, *a: ev((now(), "poll1", None)),
        )
    wrap(SyncObj, "_onTick", before=lambda s, *a: ev((now(), "tick", None)))
    wrap(SyncObj, "_applyCommand", before=lambda s, *a: ev((now(), "queued", None)))
    wrap(
        st._Replica,
        "apply_command",
        before=lambda s, *a, **k: ev((now(), "apply", None)) if "callback" not in k else None,
    )
    orig_fc = st.Store._future_callback

    def future_callback(self: Any) -> Any:
        fut, done = orig_fc(self)

        def d(res: Any, err: int) -> None:
            ev((now(), "cb", None))
            done(res, err)

        return fut, d

    st.Store._future_callback = future_callback  # type: ignore[method-assign]


class RawNode:
    """pysyncobj's own ReplCounter (``--mode raw``) or the bare state consumer above
    (``--mode raw-state``), same conf as the Store, a future bridge with one
    call_soon_threadsafe per command (pysyncobj's plain callback pattern)."""

    def __init__(
        self, self_addr: str, peers: list[str], data_dir: Path, fsync: bool, state: bool = False
    ):
        from pysyncobj import FAIL_REASON, SyncObj, SyncObjConf
        from pysyncobj.batteries import ReplCounter

        self._ok = FAIL_REASON.SUCCESS
        self.loop = asyncio.get_running_loop()
        self.counter = ReplCounter()
        self.consumer = _state_consumer() if state else None
        data_dir.mkdir(parents=True, exist_ok=True)
        conf = SyncObjConf(
            password="bench",
            bindAddress=self_addr,
            journalFile=str(data_dir / "raw.journal"),
            fullDumpFile=str(data_dir / "raw.dump"),
            appendEntriesUseBatch=False,
            connectionRetryTime=1.0,
            dynamicMembershipChange=True,
        )
        consumers = [self.counter] if self.consumer is None else [self.consumer]
        self.sync = SyncObj(self_addr, peers, conf=conf, consumers=consumers)

    async def write(self, cmd: dict | None = None) -> Any:
        fut = self.loop.create_future()

        def done(res: Any, err: int) -> None:
            def resolve() -> None:
                if not fut.done():
                    if err == self._ok:
                        fut.set_result(res)
                    else:
                        fut.set_exception(StoreError(503, f"raw failure {err}"))

            self.loop.call_soon_threadsafe(resolve)

        if self.consumer is not None and cmd is not None:
            self.consumer.apply(cmd, callback=done)
        else:
            self.counter.inc(callback=done)
        async with asyncio.timeout(10):
            return await fut


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--self", dest="self_addr", required=True)
    ap.add_argument("--peers", default="")
    ap.add_argument("--dir", required=True)
    ap.add_argument("--ctl", type=int, required=True)
    ap.add_argument("--mode", choices=["store", "raw", "raw-state"], default="store")
    ap.add_argument("--no-fsync", action="store_true")
    ap.add_argument("--compact", type=int, default=5000, help="logCompactionMinEntries")
    ap.add_argument("--name-index", action="store_true", help="experiment: see index_network_names")
    ap.add_argument("--trace", action="store_true", help="record per-step timestamps (GET /trace)")
    ap.add_argument(
        "--ae-hold-us",
        type=float,
        default=RaftConfig.idle_append_entries_hold_s * 1e6,
        help="RaftConfig.idle_append_entries_hold_s in us (0: pysyncobj's behaviour)",
    )
    ap.add_argument(
        "--no-coalesce",
        action="store_true",
        help="RaftConfig.coalesce_append_entries=False (pysyncobj's one message per command)",
    )
    args = ap.parse_args()
    if args.trace:
        install_trace()
    if args.name_index:
        index_network_names()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(message)s")
    peers = [p for p in args.peers.split(",") if p]
    data_dir = Path(args.dir)
    store: Store | None = None
    raw: RawNode | None = None
    if args.mode == "store":
        store = Store(
            args.self_addr,
            peers,
            data_dir,
            "bench-secret",
            RaftConfig(
                raft_port=int(args.self_addr.rsplit(":", 1)[1]),
                fsync=not args.no_fsync,
                log_compaction_min_entries=args.compact,
                idle_append_entries_hold_s=args.ae_hold_us / 1e6,
                coalesce_append_entries=not args.no_coalesce,
            ),
        )
    else:
        raw = RawNode(
            args.self_addr, peers, data_dir, fsync=not args.no_fsync, state=args.mode != "raw"
        )

    async def write(name: str) -> Any:
        if store is not None:
            if args.trace:
                TRACE.append((time.perf_counter(), "submit", name))
                r = await store.submit(network_cmd(name))
                TRACE.append((time.perf_counter(), "resolved", name))
                return r
            return await store.submit(network_cmd(name))
        assert raw is not None
        return await raw.write(network_cmd(name))

    async def h_status(request: web.Request) -> web.Response:
        if store is not None:
            names = store.read(lambda s: sorted(n["name"] for n in s.networks.values()))
            return web.json_response(
                {
                    "leader": store.is_leader(),
                    "leader_addr": store.leader(),
                    "term": store.term,
                    "index": store.index,
                    "networks": names,
                    "syncs": store.journal.syncs if store.journal else 0,
                    "sync_s": getattr(store.journal, "sync_seconds", 0.0),
                    "cluster": store.read(lambda s: s.cluster is not None),
                }
            )
        assert raw is not None
        names: list[str] = []
        if raw.consumer is not None:
            names = sorted(n["name"] for n in raw.consumer.state.networks.values())
        return web.json_response(
            {
                "leader": bool(raw.sync._isLeader()),
                "leader_addr": None
                if raw.sync._getLeader() is None
                else raw.sync._getLeader().address,
                "term": raw.sync.raftCurrentTerm,
                "index": raw.counter.get() if raw.consumer is None else raw.consumer.state.index,
                "networks": names,
                "syncs": 0,
                "cluster": True,
            }
        )

    async def h_init(request: web.Request) -> web.Response:
        try:
            if store is not None:
                await store.submit(CLUSTER_INIT)
            elif raw is not None and raw.consumer is not None:
                await raw.write(CLUSTER_INIT)
        except StoreError as e:
            return web.json_response({"message": e.message}, status=e.status)
        return web.json_response({"ok": True})

    async def h_write(request: web.Request) -> web.Response:
        body = await request.json()
        try:
            result = await write(str(body["name"]))
        except StoreError as e:
            return web.json_response({"message": e.message}, status=e.status)
        if isinstance(result, dict) and "error" in result:
            return web.json_response({"message": result["error"]["message"]}, status=409)
        return web.json_response({"ok": True})

    async def h_bench(request: web.Request) -> web.Response:
        body = await request.json()
        n, window, prefix = int(body["n"]), int(body["window"]), str(body["prefix"])
        sem = asyncio.Semaphore(window)
        failures = 0

        async def one(i: int) -> None:
            nonlocal failures
            try:
                r = await write(f"{prefix}{i}")
                if isinstance(r, dict) and "error" in r:
                    failures += 1
            except StoreError:
                failures += 1
            finally:
                sem.release()

        t0 = time.perf_counter()
        tasks = []
        for i in range(n):
            await sem.acquire()
            tasks.append(asyncio.create_task(one(i)))
        await asyncio.gather(*tasks)
        elapsed = time.perf_counter() - t0
        return web.json_response({"n": n, "elapsed": elapsed, "failures": failures})

    app = web.Application()
    app.router.add_get("/status", h_status)
    app.router.add_post("/init", h_init)
    app.router.add_post("/write", h_write)
    app.router.add_post("/bench", h_bench)

    async def h_trace(request: web.Request) -> web.Response:
        out = list(TRACE)
        TRACE.clear()
        return web.json_response(out)

    app.router.add_get("/trace", h_trace)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", args.ctl).start()
    print("READY", flush=True)
    with contextlib.suppress(asyncio.CancelledError):
        await asyncio.Event().wait()


if __name__ == "__main__":
    assert threading.current_thread() is threading.main_thread()
    asyncio.run(main())
