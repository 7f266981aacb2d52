"""The agent: one process per host. Wiring only: API server, manager role, worker role.

Identity and role survive restarts in ``<data-dir>/node.json`` (written atomically), so a
restarted agent comes back as the same node, with the same Raft journal, and adopts its
running tasks.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import secrets
import signal
from dataclasses import dataclass
from pathlib import Path

import aiohttp
from aiohttp import web

from swarmnet.api import docker as D
from swarmnet.api.server import make_app
from swarmnet.kernel.types import Kernel
from swarmnet.manager import CONTROL_PORT, Manager
from swarmnet.raft.state import CommandError
from swarmnet.worker import Worker

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AgentOptions:
    data_dir: Path
    advertise_addr: str
    api: str  # unix:///path or tcp://127.0.0.1:2375
    hostname: str
    netns_prefix: str = "swarmnet-"
    insecure_tcp: bool = False


def write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dfd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


class Agent:
    def __init__(self, opts: AgentOptions, kernel: Kernel):
        self.opts = opts
        self.kernel = kernel
        self.manager: Manager | None = None
        self.worker: Worker | None = None
        self.identity: dict | None = None
        self._runner: web.AppRunner | None = None
        self._busy = asyncio.Lock()
        self._roles_task: asyncio.Task | None = None
        self.role_check_s = 1.0
        opts.data_dir.mkdir(parents=True, exist_ok=True)

    @property
    def _identity_path(self) -> Path:
        return self.opts.data_dir / "node.json"

    # ---- lifecycle ------------------------------------------------------------------

    async def start(self) -> None:
        path = self._identity_path
        if path.exists():
            self.identity = json.loads(path.read_text())
            log.info("resuming as node %s (%s)", self.identity["node_id"], self.identity["role"])
            await self._start_roles(new_cluster=False)
        await self._serve_api()

    async def _serve_api(self) -> None:
        app = make_app(self)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        api = self.opts.api
        if api.startswith("unix://"):
            sock = api[len("unix://") :]
            Path(sock).parent.mkdir(parents=True, exist_ok=True)
            if os.path.exists(sock):
                os.unlink(sock)
            site = web.UnixSite(self._runner, sock)
            await site.start()
            os.chmod(sock, 0o660)
        elif api.startswith("tcp://"):
            host, _, port = api[len("tcp://") :].rpartition(":")
            if host not in ("127.0.0.1", "localhost", "::1") and not self.opts.insecure_tcp:
                raise SystemExit(
                    f"refusing to serve the API unauthenticated on {host}: TLS client "
                    "certificates come with issue 4; pass --insecure to do it anyway"
                )
            site = web.TCPSite(self._runner, host, int(port))
            await site.start()
        else:
            raise SystemExit(f"--api must be unix:///path or tcp://host:port, not {api!r}")
        log.info("API listening on %s", api)

    async def close(self) -> None:
        if self._roles_task is not None:
            self._roles_task.cancel()
            await asyncio.gather(self._roles_task, return_exceptions=True)
            self._roles_task = None
        if self._runner is not None:
            await self._runner.cleanup()
        if self.worker is not None:
            await self.worker.close()
        if self.manager is not None:
            await self.manager.close()

    async def _start_roles(self, new_cluster: bool, pools=None, subnet_size=None) -> None:
        ident = self.identity
        assert ident is not None
        if ident["role"] == "manager":
            self.manager = Manager(
                ident["node_id"], self.opts.hostname, self.opts.advertise_addr, self.opts.data_dir
            )
            await self.manager.start(
                ident["raft_password"],
                partners=ident.get("raft_members", []),
                wait_leader=new_cluster,
            )
            if new_cluster:
                result = await self.manager.init_cluster(ident["secret"], pools, subnet_size)
                if "error" in result:
                    e = result["error"]
                    await self.manager.close()
                    self.manager = None
                    raise CommandError(e["status"], e["field"], e["message"])
        self.worker = Worker(
            node_id=ident["node_id"],
            secret=ident["secret"],
            managers=ident["managers"],
            vtep=self.opts.advertise_addr,
            data_dir=self.opts.data_dir,
            netns_prefix=self.opts.netns_prefix,
            kernel=self.kernel,
        )
        await self.worker.start()
        if self._roles_task is None:
            self._roles_task = asyncio.create_task(self._follow_role(), name="agent-role")

    async def _follow_role(self) -> None:
        """Promotion and demotion: the node's role in the replicated state (seen in the
        worker's assignment) decides whether this agent runs a manager."""
        while True:
            await asyncio.sleep(self.role_check_s)
            try:
                await self._check_role()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("role change failed; retrying")

    async def _check_role(self) -> None:
        a = self.worker.assignment if self.worker is not None else None
        ident = self.identity
        if a is None or ident is None or not a.get("node"):
            return
        async with self._busy:
            role = a["node"]["role"]
            changed = False
            managers = a.get("managers") or []
            if managers and sorted(managers) != sorted(ident.get("managers", [])):
                ident["managers"], changed = list(managers), True
            if role == "manager" and self.manager is None and a.get("raft"):
                log.warning("promoted to manager: starting the Raft node")
                ident["role"] = "manager"
                ident["raft_password"] = a["raft"]["password"]
                ident["raft_members"] = a["raft"]["members"]
                write_atomic(self._identity_path, json.dumps(ident).encode())
                self.manager = Manager(
                    ident["node_id"],
                    self.opts.hostname,
                    self.opts.advertise_addr,
                    self.opts.data_dir,
                )
                await self.manager.start(ident["raft_password"], ident["raft_members"])
                return
            if role == "worker" and self.manager is not None:
                if self.manager.store is not None and self.manager.store.is_leader():
                    return  # the leader hands leadership over first (manager._membership_pass)
                log.warning("demoted to worker: stopping the Raft node")
                await self.manager.close()
                self.manager = None
                ident["role"] = "worker"
                ident.pop("raft_password", None)
                ident.pop("raft_members", None)
                self._drop_raft_files()
                changed = True
            if changed:
                write_atomic(self._identity_path, json.dumps(ident).encode())

    def _drop_raft_files(self) -> None:
        for name in ("raft.journal", "raft.journal.meta", "raft.dump"):
            (self.opts.data_dir / "raft" / name).unlink(missing_ok=True)

    # ---- swarm membership -----------------------------------------------------------

    def _check_addr(self, body: dict) -> None:
        adv = body.get("AdvertiseAddr")
        if adv:
            host = str(adv).rsplit(":", 1)[0] if str(adv).count(":") == 1 else str(adv)
            if host != self.opts.advertise_addr:
                raise CommandError(
                    400,
                    "AdvertiseAddr",
                    f"this agent advertises {self.opts.advertise_addr} (its --advertise-addr), not {host}",
                )

    async def init_swarm(self, body: dict) -> str:
        async with self._busy:
            if self.identity is not None:
                raise CommandError(
                    503,
                    "swarm",
                    'This node is already part of a swarm. Use "swarmnet swarm leave" to leave this swarm and join another one.',
                )
            self._check_addr(body)
            pools = body.get("DefaultAddrPool") or None
            if pools is not None and (
                not isinstance(pools, list) or not all(isinstance(p, str) for p in pools)
            ):
                raise CommandError(
                    400, "DefaultAddrPool", "DefaultAddrPool must be a list of CIDRs"
                )
            size = body.get("SubnetSize") or None
            if size is not None and (isinstance(size, bool) or not isinstance(size, int)):
                raise CommandError(400, "SubnetSize", "SubnetSize must be a number")
            self.identity = {
                "node_id": D.new_id(),
                "secret": secrets.token_urlsafe(32),
                "role": "manager",
                "managers": [f"{self.opts.advertise_addr}:{CONTROL_PORT}"],
                "raft_password": secrets.token_urlsafe(32),
            }
            try:
                await self._start_roles(new_cluster=True, pools=pools, subnet_size=size)
            except BaseException:
                self.identity = None
                if self.manager is not None:
                    await self.manager.close()
                    self.manager = None
                # pysyncobj wrote a journal for a cluster that never formed.
                for name in ("raft.journal", "raft.journal.meta", "raft.dump"):
                    (self.opts.data_dir / "raft" / name).unlink(missing_ok=True)
                raise
            write_atomic(self._identity_path, json.dumps(self.identity).encode())
            return self.identity["node_id"]

    async def join_swarm(self, body: dict) -> None:
        async with self._busy:
            if self.identity is not None:
                raise CommandError(
                    503,
                    "swarm",
                    'This node is already part of a swarm. Use "swarmnet swarm leave" to leave this swarm and join another one.',
                )
            self._check_addr(body)
            remotes = body.get("RemoteAddrs") or []
            if (
                not isinstance(remotes, list)
                or not remotes
                or not all(isinstance(r, str) for r in remotes)
            ):
                raise CommandError(
                    400, "RemoteAddrs", "RemoteAddrs: give at least one manager address HOST:2377"
                )
            D.split_token(body.get("JoinToken"))
            last_error = "no manager answered"
            for remote in remotes:
                target = remote if ":" in remote else f"{remote}:{CONTROL_PORT}"
                try:
                    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as s:
                        async with s.post(
                            f"http://{target}/cluster/join",
                            json={
                                "token": body["JoinToken"],
                                "hostname": self.opts.hostname,
                                "addr": self.opts.advertise_addr,
                            },
                        ) as resp:
                            data = await resp.json(content_type=None)
                            if resp.status != 200:
                                raise CommandError(
                                    400 if resp.status < 500 else 503,
                                    "JoinToken" if resp.status == 403 else "RemoteAddrs",
                                    f"{target} refused the join: {data.get('message')}",
                                )
                except (aiohttp.ClientError, TimeoutError, OSError) as e:
                    last_error = f"cannot reach manager {target}: {e}"
                    continue
                self.identity = {
                    "node_id": data["node_id"],
                    "secret": data["secret"],
                    "role": data["role"],
                    "managers": data["managers"],
                }
                if data["role"] == "manager":
                    self.identity["raft_password"] = data["raft_password"]
                    self.identity["raft_members"] = data["raft_members"]
                    self._drop_raft_files()  # a journal of an earlier swarm must not be replayed
                write_atomic(self._identity_path, json.dumps(self.identity).encode())
                await self._start_roles(new_cluster=False)
                if self.manager is not None:
                    await self._wait_caught_up()
                return
            raise CommandError(503, "RemoteAddrs", last_error)

    async def _wait_caught_up(self, timeout_s: float = 60.0) -> None:
        """A joining manager answers ``swarm join`` once its replica holds the swarm (the
        leader added it to the Raft cluster and streamed it the log or a snapshot)."""
        assert self.manager is not None and self.manager.store is not None
        store = self.manager.store
        node_id = self.identity["node_id"] if self.identity else ""
        deadline = asyncio.get_running_loop().time() + timeout_s
        while not store.read(lambda s: node_id in s.nodes):
            if asyncio.get_running_loop().time() > deadline:
                raise CommandError(
                    503,
                    "RemoteAddrs",
                    "joined, but this manager has not caught up with the swarm's Raft log yet",
                )
            await store.wait_change(0.5)

    async def leave_swarm(self, force: bool) -> None:
        async with self._busy:
            if self.identity is None:
                raise CommandError(503, "swarm", "This node is not part of a swarm")
            if self.identity["role"] == "manager" and not force:
                raise CommandError(
                    503,
                    "force",
                    "You are attempting to leave the swarm on a node that is participating as a manager. "
                    "Removing the last manager erases all current state of the swarm. Use --force to ignore this message.",
                )
            if self.worker is not None:
                for t in list(self.worker.supervisor.tasks()):
                    await self.worker.supervisor.stop(t)
                self.worker.assignment = {"tasks": [], "networks": {}, "endpoints": [], "index": 0}
                await self.worker.sync()
                await self.worker.close()
                self.worker = None
            if self.manager is not None:
                await self.manager.close()
                self.manager = None
            if self._roles_task is not None:
                self._roles_task.cancel()
                self._roles_task = None
            self._identity_path.unlink(missing_ok=True)
            self._drop_raft_files()
            self.identity = None

    # ---- info -----------------------------------------------------------------------

    def swarm_header(self) -> str:
        if self.identity is None:
            return "inactive"
        return f"active/{self.identity['role']}"

    def info(self) -> dict:
        ident = self.identity
        swarm: dict = {
            "NodeID": ident["node_id"] if ident else "",
            "NodeAddr": self.opts.advertise_addr,
            "LocalNodeState": "active" if ident else "inactive",
            "ControlAvailable": bool(ident and ident["role"] == "manager"),
            "Error": "",
            "RemoteManagers": [
                {"NodeID": "", "Addr": m} for m in (ident or {}).get("managers", [])
            ],
        }
        if self.manager is not None and self.manager.store is not None:
            st = self.manager.store.read(
                lambda s: (
                    len(s.nodes),
                    sum(1 for n in s.nodes.values() if n["role"] == "manager"),
                    s.cluster,
                )
            )
            swarm["Nodes"], swarm["Managers"] = st[0], st[1]
            if st[2] is not None:
                swarm["Cluster"] = {"ID": st[2]["id"], "Version": {"Index": st[2]["version"]}}
        running = len(self.worker.supervisor.tasks()) if self.worker else 0
        return {
            "ID": ident["node_id"] if ident else "",
            "Name": self.opts.hostname,
            "ServerVersion": D.ENGINE_VERSION,
            "OperatingSystem": "linux",
            "OSType": "linux",
            "Architecture": "x86_64",
            "Containers": running,
            "ContainersRunning": running,
            "Swarm": swarm,
        }


_fork_hook_registered = False


def _forget_loop_signals() -> None:
    """In a child forked from the agent (pyroute2 forks helpers to enter namespaces): drop
    the event loop's signal wake-up fd and handlers. Otherwise a SIGTERM that pyroute2 sends
    its own helper is written by the helper's inherited C handler into the socket shared
    with the agent's loop, and the agent shuts down as if it had been sent SIGTERM itself."""
    signal.set_wakeup_fd(-1)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_DFL)


async def run_agent(opts: AgentOptions, kernel: Kernel | None = None) -> None:
    global _fork_hook_registered
    if not _fork_hook_registered:  # process-wide and irrevocable: once per process
        os.register_at_fork(after_in_child=_forget_loop_signals)
        _fork_hook_registered = True
    if kernel is None:
        from swarmnet.kernel.netlink import NetlinkKernel

        kernel = NetlinkKernel()
    agent = Agent(opts, kernel)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await agent.start()
    log.info("agent %s up (advertise %s)", opts.hostname, opts.advertise_addr)
    await stop.wait()
    log.info("shutting down (task processes keep running)")
    await agent.close()
    # The kernel's netlink sockets belong to the worker's kernel thread, now stopped; the
    # process exit closes them.
