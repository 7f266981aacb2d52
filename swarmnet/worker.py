"""The worker role (every node): follow the manager's assignments, run the tasks, program
the overlays, report task states.

Level-triggered: each new assignment (or a periodic resync) recomputes the node's whole
desired state and reconciles the kernel and the task processes against it. Nothing is
programmed before the first assignment has arrived, so an agent restarted with tasks
running adopts them and leaves their kernel objects untouched (the reconciler finds them
already as desired).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import ssl
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import aiohttp

from swarmnet.api.docker import service_argv
from swarmnet.kernel.errors import KernelError
from swarmnet.kernel.types import Kernel
from swarmnet.overlay.plan import NodeOverlay, RemoteEndpoint, node_overlay, sandbox_name
from swarmnet.overlay.reconciler import EntryGuard, OverlayReconciler, RemotesRead
from swarmnet.runtime.supervisor import Supervisor, TaskSpec
from swarmnet.sandbox_hooks import AssignmentEndpoints, EndpointSource, SandboxHook

if TYPE_CHECKING:
    from swarmnet.ipsec_hook import IpsecHook

log = logging.getLogger(__name__)

# Assignment keys that say nothing about what this node must run or program.
_VOLATILE = frozenset({"index", "managers", "leader"})


@dataclass(frozen=True)
class WorkerConfig:
    resync_s: float = 30.0  # full reconcile even without news: repairs what someone else broke
    retry_min_s: float = 0.2  # manager unreachable: back off from here...
    retry_max_s: float = 5.0  # ...up to here, with jitter
    refused_retry_s: float = 30.0  # 401/403 (removed, bad certificate): retry slowly
    status_flush_s: float = 0.05  # coalesce task state reports into one request
    request_timeout_s: float = 30.0  # > the manager's long-poll hold time
    # Gossip table events ask for a resync: at most one per this interval, so a burst of
    # endpoint changes costs one kernel pass, and the first one waits no longer than this.
    resync_min_s: float = 0.02


def _wall(t_mono: float) -> float:
    """The wall-clock time of a past ``time.monotonic()`` stamp (for the gossip log)."""
    return time.time() - (time.monotonic() - t_mono)


class Worker:
    def __init__(
        self,
        *,
        node_id: str,
        ssl_context: ssl.SSLContext,
        managers: list[str],
        vtep: str,
        data_dir: Path,
        netns_prefix: str,
        kernel: Kernel,
        config: WorkerConfig | None = None,
        fast_kernel: Kernel | None = None,
    ):
        self.node_id = node_id
        # pki.client_context: our certificate, the cluster CA pinned, the server must hold a
        # manager certificate. The agent swaps the credentials in it on renewal.
        self._ssl = ssl_context
        self.managers = list(managers)
        self.vtep = vtep
        self.netns_prefix = netns_prefix
        self.kernel = kernel
        self.config = config or WorkerConfig()
        # The remote-entry model the full pass and the fast path share (reconciler.py).
        self.guard = EntryGuard()
        self.reconciler = OverlayReconciler(kernel, self.guard)
        self.supervisor = Supervisor(data_dir / "tasks", self._on_status)
        self.assignment: dict | None = None
        self._pending: dict[str, dict] = {}
        self._flush_wake = asyncio.Event()
        self._tasks: list[asyncio.Task] = []
        self._session: aiohttp.ClientSession | None = None
        self._kernel_lock = asyncio.Lock()
        self._underlay_mtu: int | None = None
        self._stopping: set[str] = set()
        self.reconcile_errors = 0
        # Seams (swarmnet/sandbox_hooks.py): where remote endpoints come from, and the
        # per-sandbox services (DNS, LB) the agent plugs in.
        self.endpoints: EndpointSource = AssignmentEndpoints()
        self.hooks: list[SandboxHook] = []
        self.ipsec: IpsecHook | None = None  # encrypted overlays (the agent plugs it in)
        # Each task's resolv.conf; None: a copy of the host's. The services hook sets it to
        # the embedded DNS ("nameserver 127.0.0.11").
        self.resolv_conf: str | None = None
        # Gossip (swarmnet/gossip_endpoints.py): called with every assignment (key ring,
        # peers); ``gossip_ack`` returns what we acknowledge on the next poll (key digest).
        self.on_assignment: list[Callable[[dict], None]] = []
        self.gossip_ack: Callable[[], str] | None = None
        self._dirty = asyncio.Event()
        # Every kernel call runs on this one thread: pyroute2's sync sockets keep per-thread
        # state and run their own (non-uvloop) event loop, which cannot live on the agent's
        # uvloop thread; one thread also serialises kernel programming.
        self._kx = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kernel")
        # ...except the fast path's FDB/neighbour deltas: they get a thread and a kernel
        # (netlink sockets, same namespace) of their own, so that a gossip event never
        # queues behind a full pass or a hook's nftables work. ``self.guard`` keeps the two
        # writers of remote entries from undoing each other. A kernel that cannot be cloned
        # (the fake) shares the main thread, as before, unless a test passes one.
        if fast_kernel is None:
            clone = getattr(kernel, "clone", None)
            fast_kernel = clone() if clone is not None else None
        self._own_fast_kernel = fast_kernel is not None and fast_kernel is not kernel
        self.fast_kernel: Kernel = fast_kernel if fast_kernel is not None else kernel
        self._fx = (
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="kernel-fast")
            if fast_kernel is not None
            else self._kx
        )
        self._synced_content: dict | None = None  # the last assignment synced cleanly...
        self._synced_at = -float("inf")  # ...and when that sync started (monotonic)
        self.syncs_skipped = 0  # assignments that changed only in _VOLATILE keys
        self._last_full = -float("inf")  # monotonic time of the last full pass
        self.full_skipped = 0  # syncs that needed only the remote-entry delta
        self._read_seq = 0  # counts reads of the remote endpoints (RemotesRead.seq)
        self._fast_scheduled = False
        self._fast_inflight = False
        self._fast_again = False
        self._fast_first_event: float | None = None  # first request_sync the next pass covers
        self.fastpath_applied = 0  # fast-path passes that changed the kernel
        self.fastpath_fallbacks = 0  # fast-path passes that failed and asked for a full sync

    # ---- lifecycle ------------------------------------------------------------------

    async def start(self) -> None:
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=self.config.request_timeout_s),
            connector=aiohttp.TCPConnector(ssl=self._ssl),
        )
        await self.supervisor.start()
        self._tasks.append(asyncio.create_task(self._follow(), name="worker-follow"))
        self._tasks.append(asyncio.create_task(self._flush_loop(), name="worker-status"))
        self._tasks.append(asyncio.create_task(self._resync_loop(), name="worker-resync"))

    async def close(self) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.supervisor.close()  # leaves task processes running for the next agent
        for hook in self.hooks:
            await hook.close()
        if self.ipsec is not None:
            await self.ipsec.close()
        if self._session is not None:
            await self._session.close()
        self._kx.shutdown(wait=True)
        if self._fx is not self._kx:
            self._fx.shutdown(wait=True)
        if self._own_fast_kernel:
            close = getattr(self.fast_kernel, "close", None)
            if close is not None:
                close()

    async def run_in_kernel_thread(self, fn, *args):
        """Run ``fn(*args)`` on the one kernel thread (hooks' kernel work)."""
        return await asyncio.get_running_loop().run_in_executor(self._kx, fn, *args)

    # ---- talking to the manager -----------------------------------------------------

    def _url(self, path: str) -> str:
        return f"https://{self.managers[0]}{path}"

    async def renew(self, csr_pem: bytes) -> dict:
        """POST /cluster/renew to the managers in turn: {certificate, role}. Raises the last
        error if none answers."""
        assert self._session is not None
        last: Exception = ConnectionError("no manager")
        for _ in range(len(self.managers)):
            try:
                async with self._session.post(
                    self._url("/cluster/renew"), json={"csr": csr_pem.decode()}
                ) as resp:
                    resp.raise_for_status()
                    return await resp.json()
            except (aiohttp.ClientError, TimeoutError, OSError) as e:
                last = e
                self._next_manager()
        raise last

    async def _follow(self) -> None:
        index = -1
        delay = self.config.retry_min_s
        while True:
            try:
                assert self._session is not None
                params = {"index": str(index)}
                if self.gossip_ack is not None and self.gossip_ack():
                    params["gossip"] = self.gossip_ack()
                async with self._session.get(
                    self._url("/cluster/assignments"), params=params
                ) as resp:
                    if resp.status in (401, 403):
                        text = await resp.text()
                        log.error(
                            "manager %s REFUSES this node (HTTP %d: %s): removed from the "
                            "swarm (node rm) or a bad certificate; retrying slowly",
                            self.managers[0],
                            resp.status,
                            text.strip()[:200],
                        )
                        delay = self.config.refused_retry_s
                        raise ConnectionError(f"refused: HTTP {resp.status}")
                    resp.raise_for_status()
                    assignment = await resp.json()
                delay = self.config.retry_min_s
            except asyncio.CancelledError:
                raise
            except Exception as e:
                log.warning("assignments from %s: %s", self.managers[0], e)
                self._next_manager()
                await asyncio.sleep(delay * (0.5 + random.random()))
                delay = min(delay * 2, max(delay, self.config.retry_max_s))
                continue
            index = assignment["index"]
            self.assignment = assignment
            self._follow_leader(assignment)
            for cb in self.on_assignment:
                try:
                    cb(assignment)
                except Exception:
                    log.exception("assignment callback failed")
            # Most store changes (another node's task reporting "running") change nothing
            # this node is told but the index: no sync for those, unless the last one with
            # this content failed or is resync_s old (the pass that repairs outside damage).
            content = self._needs_sync(assignment)
            if content is None:
                continue
            self._synced_content, started, errors = None, time.monotonic(), self.reconcile_errors
            try:
                await self.sync()
            except Exception:
                self.reconcile_errors += 1
                log.exception("sync failed; retrying on the next assignment")
                await asyncio.sleep(delay)
            if self.reconcile_errors == errors:
                self._synced_content, self._synced_at = content, started

    def _needs_sync(self, assignment: dict) -> dict | None:
        """The assignment's content if it needs a sync; None if the last clean sync had the
        same content less than resync_s ago."""
        content = {k: v for k, v in assignment.items() if k not in _VOLATILE}
        if (
            content == self._synced_content
            and time.monotonic() - self._synced_at < self.config.resync_s
        ):
            self.syncs_skipped += 1
            return None
        return content

    def metrics(self) -> dict[str, int]:
        """Counters of the overlay programming (for the agent's /metrics)."""
        return {
            "overlay_full_passes": self.reconciler.passes,
            "overlay_delta_only_syncs": self.full_skipped,
            "overlay_syncs_skipped": self.syncs_skipped,
            "overlay_fastpath_applied": self.fastpath_applied,
            "overlay_fastpath_fallbacks": self.fastpath_fallbacks,
            "overlay_fastpath_replans": self.guard.replans,
            "overlay_reconcile_errors": self.reconcile_errors,
        }

    def request_sync(self) -> None:
        """An endpoint changed (a gossip table event). Remote endpoints are programmed by the
        fast path within a few ms (``_fast_path``: the FDB/neighbour delta only, no
        snapshot, no hooks, on its own thread and sockets); a full sync (coalesced with
        others) follows only when the fast path cannot do it (no pass yet, a failed op, an
        encrypted network). Full passes, which diff against the kernel and so repair
        anything else, run for every assignment that changes more than remote endpoints
        and at least every ``resync_s``."""
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            self._dirty.set()  # not on the loop (a test, a thread): the plain resync
            return
        if self._fast_first_event is None:
            self._fast_first_event = time.monotonic()
        self._fast_path()

    async def _resync_loop(self) -> None:
        while True:
            # News, or resync_s without any: then the sync is a full pass (it repairs what
            # someone else broke; see sync's delta-only case).
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._dirty.wait(), self.config.resync_s)
            await asyncio.sleep(self.config.resync_min_s)
            self._dirty.clear()
            try:
                await self.sync()
            except asyncio.CancelledError:
                raise
            except Exception:
                self.reconcile_errors += 1
                log.exception("resync failed; retrying on the next change or assignment")

    def _next_manager(self) -> None:
        """Manager failover: the one that failed goes to the back of the list."""
        if len(self.managers) > 1:
            self.managers.append(self.managers.pop(0))

    def _follow_leader(self, assignment: dict) -> None:
        """Learn the manager list, and poll the leader: only the leader tracks heartbeats."""
        managers = [m for m in assignment.get("managers") or [] if isinstance(m, str)]
        if not managers:
            return
        leader = assignment.get("leader")
        current = self.managers[0]
        ordered = sorted(managers, key=lambda m: (m != leader, m != current))
        if ordered != self.managers:
            if ordered[0] != current:
                log.info("following manager %s (leader %s)", ordered[0], leader)
            self.managers = ordered

    def _on_status(self, task_id: str, state: str, err: str, pid: int | None) -> None:
        st = {"id": task_id, "state": state, "err": err or ""}
        if pid:
            st["pid"] = pid
        self._pending[task_id] = st
        self._flush_wake.set()
        # Gossip withdraws a task whose process is not running at once (DNS, LBs and FDBs
        # everywhere), without waiting for the managers to react to the report.
        task_state = getattr(self.endpoints, "task_state", None)
        if task_state is not None:
            task_state(task_id, state)

    async def _flush_loop(self) -> None:
        while True:
            await self._flush_wake.wait()
            await asyncio.sleep(self.config.status_flush_s)
            self._flush_wake.clear()
            batch, self._pending = list(self._pending.values()), {}
            if not batch:
                continue
            try:
                assert self._session is not None
                async with self._session.post(
                    self._url("/cluster/status"), json={"statuses": batch}
                ) as resp:
                    resp.raise_for_status()
            except asyncio.CancelledError:
                raise
            except Exception as e:
                log.warning("status report failed (%s); will retry", e)
                self._next_manager()
                for st in batch:
                    self._pending.setdefault(st["id"], st)
                await asyncio.sleep(self.config.retry_min_s)
                self._flush_wake.set()

    # ---- reconciling ----------------------------------------------------------------

    def local_tasks(self) -> list[dict]:
        """Tasks of this node with their sandbox and pid (for ``swarmnet exec``)."""
        out = []
        for t in (self.assignment or {}).get("tasks", []):
            out.append(
                {
                    "id": t["id"],
                    "name": t["name"],
                    "netns": sandbox_name(self.netns_prefix, t["id"]),
                    "pid": self.supervisor.pid(t["id"]),
                    "desired_state": t["desired_state"],
                }
            )
        return out

    async def sync(self) -> None:
        """One level-triggered pass: stop what must stop, program the kernel, start tasks."""
        assignment = self.assignment
        if assignment is None:
            return
        t_wait = time.monotonic()
        async with self._kernel_lock:
            t_start = time.monotonic()
            running = [
                t for t in assignment["tasks"] if t["desired_state"] == "running" and t["spec"]
            ]
            wanted = {t["id"] for t in running}
            # 1. Stop processes first, so that their sandboxes can go afterwards.
            for t in assignment["tasks"]:
                if t["id"] not in wanted:
                    if t["id"] not in self._stopping:
                        self._stopping.add(t["id"])
                        await self.supervisor.stop(t["id"])
                    self._on_status(t["id"], "shutdown", "", None)
            for task_id in list(self.supervisor.tasks()):
                if task_id not in wanted:
                    await self.supervisor.stop(task_id)
            # Encrypted networks (swarmnet/ipsec_hook.py): without ESP a task fails, without
            # keys it waits; ESP is programmed before the overlay pass (never cleartext).
            if self.ipsec is not None:
                running = await self.ipsec.admit(self, assignment, running)
                await self.ipsec.before_reconcile(self, assignment, running)
            # Hooks let go of sandboxes that are about to be deleted (DNS sockets, LB).
            keep = {sandbox_name(self.netns_prefix, t["id"]) for t in running}
            for hook in self.hooks:
                try:
                    await hook.before_reconcile(self, assignment, keep)
                except Exception:
                    log.exception("hook %s before_reconcile failed", type(hook).__name__)
            # 2. The kernel: sandboxes, bridges, VXLAN, veths, FDB and neighbours.
            loop = asyncio.get_running_loop()
            t_before = time.monotonic()
            mtu = await loop.run_in_executor(self._kx, self._underlay)
            node = self._node_overlay(assignment, running, mtu)
            rec: list[float] = []  # the full pass's start and end (the timings log)
            read: RemotesRead | None = None
            ops: list = []
            full = True
            if time.monotonic() - self._last_full < self.config.resync_s:
                # Only remote endpoints changed since the last full pass (the usual case:
                # another node's task came or went): their delta, on the fast thread,
                # instead of snapshotting every namespace. A full pass still runs at least
                # every resync_s (the resync loop), and whenever anything else changed.
                read = self.guard.latest  # the one _node_overlay has just offered
                assert read is not None
                n, full = await loop.run_in_executor(self._fx, self._delta_for, node, read)
                if not full:
                    self.full_skipped += 1
            if full:
                ops, read = await loop.run_in_executor(self._kx, self._reconcile, node, rec)
                self._last_full = time.monotonic()
            t_kernel = time.monotonic()
            if ops:
                log.info(
                    "overlay: applied %d kernel ops (%s)",
                    len(ops),
                    ", ".join(sorted({type(o).__name__ for o in ops})),
                )
            if self.ipsec is not None:  # removals only now that VXLAN devices/FDB are gone
                await self.ipsec.after_reconcile(self, assignment, running)
            self._programmed(read.mark if read is not None else None, _wall(t_kernel))
            for hook in self.hooks:
                try:
                    await hook.after_reconcile(self, assignment, running)
                except Exception:
                    self.reconcile_errors += 1
                    log.exception("hook %s after_reconcile failed", type(hook).__name__)
            # 3. Processes.
            for t in running:
                self.supervisor.ensure(self._task_spec(t))
            t_end = time.monotonic()
            log.info(
                "overlay: sync timings (total %.1f lockwait %.1f before %.1f kernel %.1f "
                "reconcile %.1f after %.1f ms) full=%d",
                1000 * (t_end - t_wait), 1000 * (t_start - t_wait), 1000 * (t_before - t_start),
                1000 * (t_kernel - t_before), 1000 * (rec[1] - rec[0]) if rec else 0.0,
                1000 * (t_end - t_kernel), full,
            )  # fmt: skip

    def _reconcile(self, node: NodeOverlay, rec: list[float]) -> tuple[list, RemotesRead | None]:
        """Kernel thread: the full pass (programming the newest remotes read, which may be
        newer than ``node``'s: see reconciler.EntryGuard). Returns the ops and that read."""
        rec.append(time.monotonic())
        ops = self.reconciler.reconcile(node)
        rec.append(time.monotonic())
        return ops, self.reconciler.last_read

    def _delta_for(self, node: NodeOverlay, read: RemotesRead) -> tuple[int, bool]:
        """Fast kernel thread: bring the remote entries to ``read`` if the kernel is known
        to hold ``node`` in everything else; (ops, whether a full pass is needed)."""
        try:
            return self.guard.fast_apply(self.fast_kernel, read, expect=node)
        except KernelError as e:
            log.warning("overlay: delta-only sync failed (%s); doing a full pass", e)
            return 0, True

    def _programmed(self, mark: int | None, at: float | None = None) -> None:
        """Tell the endpoint source (gossip) which of its events are now in the kernel, and
        when they got there (``at``, wall clock: the stamp is the kernel thread's, not the
        time the loop gets round to this call)."""
        programmed = getattr(self.endpoints, "programmed", None)
        if programmed is not None:
            programmed(mark, at=at) if mark is not None else programmed()

    def _read_remotes(self, remotes: tuple[RemoteEndpoint, ...]) -> RemotesRead:
        """Loop thread: stamp a read of the remotes and offer it to the guard, in read order
        (the full pass always programs the newest read)."""
        self._read_seq += 1
        read = RemotesRead(self._read_seq, remotes, getattr(self.endpoints, "read_seq", None))
        self.guard.offer(read)
        return read

    # ---- the fast path for remote endpoints -------------------------------------------

    def _fast_path(self) -> None:
        """Remote endpoints changed: program the FDB/neighbour delta now (see
        ``request_sync``). Coalesced: one read of the remotes per loop iteration, and at
        most one delta in flight (events during it cause one more after it)."""
        if self._fast_inflight:
            self._fast_again = True
        elif not self._fast_scheduled:
            self._fast_scheduled = True
            asyncio.get_running_loop().call_soon(self._fast_start)

    def _fast_start(self) -> None:
        self._fast_scheduled = False
        t_ev, self._fast_first_event = self._fast_first_event, None
        t_read = time.monotonic()
        assignment = self.assignment
        if assignment is None:
            return
        try:
            remotes = self._current_remotes(assignment)
        except Exception:
            log.exception("overlay fast path: reading remote endpoints failed")
            self._dirty.set()
            return
        read = self._read_remotes(remotes)
        stamps = [t_ev if t_ev is not None else t_read, t_read]
        fut = asyncio.get_running_loop().run_in_executor(self._fx, self._fast_apply, read, stamps)
        self._fast_inflight = True
        fut.add_done_callback(lambda f: self._fast_done(f, read.mark, stamps))

    def _current_remotes(self, assignment: dict) -> tuple[RemoteEndpoint, ...]:
        # What _node_overlay and the fast path both read.
        remotes = tuple(r for r in self.endpoints.remotes(assignment) if r.vtep != self.vtep)
        for hook in self.hooks:
            more = getattr(hook, "extra_remotes", None)
            if more is not None:
                remotes += tuple(r for r in more(self, assignment) if r.vtep != self.vtep)
        return remotes

    def _fast_apply(self, read: RemotesRead, stamps: list[float]) -> tuple[int, bool]:
        """Fast kernel thread: apply the delta from the model to ``read``. Returns the ops
        applied and whether a full sync is still needed."""
        stamps.append(time.monotonic())
        try:
            return self.guard.fast_apply(
                self.fast_kernel, read, lambda: stamps.append(time.monotonic())
            )
        except KernelError as e:
            log.warning("overlay fast path: %s; leaving it to a full sync", e)
            return 0, True
        finally:
            if len(stamps) == 3:  # returned before taking the lock
                stamps.append(stamps[-1])
            stamps.append(time.monotonic())

    def _fast_done(self, fut: asyncio.Future, mark: int | None, stamps: list[float]) -> None:
        stamps.append(time.monotonic())
        self._fast_inflight = False
        if self._fast_again:
            self._fast_again = False
            self._fast_path()
        if fut.cancelled():
            return
        e = fut.exception()
        if e is not None:
            log.error("overlay fast path failed: %r", e)
            n, full = 0, True
        else:
            n, full = fut.result()
        if full:
            self.fastpath_fallbacks += 1
            self._dirty.set()
            return
        if n:
            self.fastpath_applied += 1
            ms = [1000 * (b - a) for a, b in zip(stamps, stamps[1:], strict=False)]
            log.info(
                "overlay fast path: applied %d FDB/neighbour ops "
                "(loop %.1f queue %.1f lock %.1f apply %.1f back %.1f ms)",
                n, *ms,
            )  # fmt: skip
        self._programmed(mark, _wall(stamps[-2]))  # when the apply ended, not now

    def _underlay(self) -> int:
        if self._underlay_mtu is None:
            state = self.kernel.snapshot(None)
            mtu = 1500
            for a in state.addrs:
                if a.cidr.split("/")[0] == self.vtep and a.dev in state.links:
                    mtu = state.links[a.dev].mtu
            self._underlay_mtu = mtu
        return self._underlay_mtu

    def _node_overlay(self, assignment: dict, running: list[dict], mtu: int) -> NodeOverlay:
        # Hooks may add endpoints of their own (the services hook's ingress sandbox).
        extra = []
        for hook in self.hooks:
            more = getattr(hook, "extra_attachments", None)
            extra += list(more(self, assignment)) if more is not None else []
        # Other nodes' endpoints, and the hooks' (the services hook's ingress endpoints).
        remotes = self._read_remotes(self._current_remotes(assignment)).remotes
        return node_overlay(
            self.vtep, mtu, self.netns_prefix, assignment["networks"], running, extra, remotes
        )

    def _task_spec(self, t: dict) -> TaskSpec:
        spec = t["spec"]
        env = {
            "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "HOME": "/root",
        }
        for item in spec["TaskTemplate"]["ContainerSpec"].get("Env") or []:
            k, _, v = item.partition("=")
            env[k] = v
        env.update(
            {
                "SWARMNET_SERVICE_NAME": t["service_name"],
                "SWARMNET_TASK_NAME": t["name"],
                "SWARMNET_TASK_ID": t["id"],
                "SWARMNET_NODE_ID": self.node_id,
            }
        )
        hosts = tuple((a["address"].split("/")[0], t["name"]) for a in t["networks"][:1])
        return TaskSpec(
            task_id=t["id"],
            name=t["name"],
            netns=sandbox_name(self.netns_prefix, t["id"]),
            argv=tuple(service_argv(spec)),
            env=tuple(sorted(env.items())),
            hosts=hosts,
            resolv_conf=self.resolv_conf,
        )
