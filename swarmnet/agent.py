"""The agent: one process per host. Wiring only: API server, manager role, worker role.

Identity and role survive restarts in ``<data-dir>/node.json`` (written atomically, 0600)
and the node's CA certificate, key and certificate in ``<data-dir>/certificates`` (0700),
so a restarted agent comes back as the same node, with the same Raft journal, and adopts
its running tasks. See docs/security.md for the trust model.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import logging
import os
import random
import secrets
import shutil
import signal
import ssl
from dataclasses import dataclass
from pathlib import Path

import aiohttp
from aiohttp import web

from swarmnet import pki
from swarmnet.api import docker as D
from swarmnet.api.server import make_app
from swarmnet.gossip_endpoints import GossipEndpoints
from swarmnet.ipsec_hook import hook_for as ipsec_hook_for
from swarmnet.kernel.types import Kernel
from swarmnet.manager import CONTROL_PORT, Manager, certs_dir
from swarmnet.raft.state import CommandError
from swarmnet.services_hook import ServicesHook
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
    # A TCP API with TLS client certificates (docker's --tlsverify): all three paths needed.
    tlsverify: bool = False
    tlscacert: Path | None = None  # CA whose certificates are admitted as API clients
    tlscert: Path | None = None  # the API server's certificate chain
    tlskey: Path | None = None  # ... and its key
    # Load balancer of task sandboxes: "auto" takes IPVS where the kernel has it, else
    # nftables; "ipvs" or "nft" force one (an absent IPVS is then a task error, not a
    # silent fallback).
    lb_backend: str = "auto"


def write_atomic(path: Path, data: bytes) -> None:
    """Atomic and durable; created 0600 (node.json holds the Raft password), never wider
    even for an instant: the mode is given at creation, not chmod-ed afterwards."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()  # a leftover of a crash, maybe with other permissions
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    with open(fd, "wb") as f:
        os.fchmod(f.fileno(), 0o600)
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
        self.gossip: GossipEndpoints | None = None
        self.identity: dict | None = None
        self._runner: web.AppRunner | None = None
        self._busy = asyncio.Lock()
        self._roles_task: asyncio.Task | None = None
        self._renew_task: asyncio.Task | None = None
        self._client_ctx: ssl.SSLContext | None = None  # the worker's mTLS context
        self.role_check_s = 1.0
        self.certs = certs_dir(opts.data_dir)
        # 0700: the data dir holds node.json (Raft password), the certificates (the node key,
        # on managers the CA key) and the Raft journal and dump (the CA key, replicated).
        opts.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(opts.data_dir, 0o700)

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
            ctx = self._api_tls() if self.opts.tlsverify else None
            loopback = host in ("127.0.0.1", "localhost", "::1")
            if ctx is None and not loopback:
                if not self.opts.insecure_tcp:
                    raise SystemExit(
                        f"refusing to serve the API unauthenticated on {host}: whoever reaches "
                        "it administers the swarm. Pass --tlsverify --tlscacert CA --tlscert "
                        "CERT --tlskey KEY (clients need a certificate signed by CA), or "
                        "--insecure to serve it to anyone anyway"
                    )
                log.warning(
                    "--insecure: the API on %s has NO authentication; anyone who can reach "
                    "it controls the swarm and every task on it",
                    host,
                )
            site = web.TCPSite(self._runner, host, int(port), ssl_context=ctx)
            await site.start()
        else:
            raise SystemExit(f"--api must be unix:///path or tcp://host:port, not {api!r}")
        log.info("API listening on %s", api)

    def _api_tls(self) -> ssl.SSLContext:
        """docker's ``--tlsverify``: TLS with client certificates from ``--tlscacert``
        required on every connection. TLS 1.2+ as the docker CLI speaks it."""
        o = self.opts
        missing = [
            flag
            for flag, path in (
                ("--tlscacert", o.tlscacert),
                ("--tlscert", o.tlscert),
                ("--tlskey", o.tlskey),
            )
            if path is None or not Path(path).is_file()
        ]
        if missing:
            raise SystemExit(
                f"--tlsverify needs {', '.join(missing)}: existing files (the CA that signs "
                "API clients' certificates, this server's certificate and key)"
            )
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.verify_mode = ssl.CERT_REQUIRED
        try:
            ctx.load_verify_locations(cafile=str(o.tlscacert))
            ctx.load_cert_chain(str(o.tlscert), str(o.tlskey))
        except (ssl.SSLError, OSError) as e:
            raise SystemExit(f"--tlsverify: cannot load the TLS files: {e}") from None
        return ctx

    async def close(self) -> None:
        if self._renew_task is not None:
            self._renew_task.cancel()
            await asyncio.gather(self._renew_task, return_exceptions=True)
            self._renew_task = None
        if self._roles_task is not None:
            self._roles_task.cancel()
            await asyncio.gather(self._roles_task, return_exceptions=True)
            self._roles_task = None
        if self._runner is not None:
            await self._runner.cleanup()
        if self.gossip is not None:
            await self.gossip.close()
            self.gossip = None
        if self.worker is not None:
            await self.worker.close()
        if self.manager is not None:
            await self.manager.close()

    def _raft_dir(self) -> Path:
        """pysyncobj's journal and dump hold the cluster record, CA key included: made 0700
        before pysyncobj creates its files there, and those files narrowed to 0600."""
        d = self.opts.data_dir / "raft"
        d.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(d, 0o700)
        return d

    def _harden_raft_files(self) -> None:
        d = self._raft_dir()
        for f in d.iterdir():
            if f.is_file():
                os.chmod(f, 0o600)

    async def _start_manager(self, wait_leader: bool = False) -> None:
        ident = self.identity
        assert ident is not None
        self._raft_dir()
        self.manager = Manager(
            ident["node_id"], self.opts.hostname, self.opts.advertise_addr, self.opts.data_dir
        )
        await self.manager.start(
            ident["raft_password"],
            partners=ident.get("raft_members", []),
            wait_leader=wait_leader,
        )
        self._harden_raft_files()

    async def _start_roles(
        self, new_cluster: bool, pools=None, subnet_size=None, ca=None, tokens=None
    ) -> None:
        ident = self.identity
        assert ident is not None
        if ident["role"] == "manager":
            await self._start_manager(wait_leader=new_cluster)
            assert self.manager is not None
            if new_cluster:
                result = await self.manager.init_cluster(ca, tokens, pools, subnet_size)
                if "error" in result:
                    e = result["error"]
                    await self.manager.close()
                    self.manager = None
                    raise CommandError(e["status"], e["field"], e["message"])
                self._harden_raft_files()
        creds = pki.NodeCredentials.load(self.certs)
        self._client_ctx = pki.client_context(
            pki.RootCA.load(self.certs).public(), creds.cert_pem, creds.key_pem
        )
        self.worker = Worker(
            node_id=ident["node_id"],
            ssl_context=self._client_ctx,
            managers=ident["managers"],
            vtep=self.opts.advertise_addr,
            data_dir=self.opts.data_dir,
            netns_prefix=self.opts.netns_prefix,
            kernel=self.kernel,
        )
        if hasattr(self.worker, "hooks"):  # not a stand-in worker (API unit tests)
            # embedded DNS, VIPs, mesh (issue 6)
            self.worker.hooks.append(ServicesHook(lb_backend=self.opts.lb_backend))
        self.worker.ipsec = ipsec_hook_for(self.kernel, self.opts.data_dir)  # --opt encrypted
        await self._start_gossip(self.worker)
        await self.worker.start()
        if self._roles_task is None:
            self._roles_task = asyncio.create_task(self._follow_role(), name="agent-role")
        if self._renew_task is None:
            self._renew_task = asyncio.create_task(self._renew_loop(), name="agent-renew")

    # ---- gossip ---------------------------------------------------------------------

    async def _start_gossip(self, worker: Worker) -> None:
        """Every node gossips on ADVERTISE:7946, named by its node id, with the managers'
        key ring (join answer or node.json; after ``init``: the first assignment). The
        overlay's remote endpoints come from the gossip tables from now on."""
        ident = self.identity
        assert ident is not None
        if not hasattr(worker, "on_assignment"):
            return  # a stand-in worker (API unit tests): nothing to feed
        if self.gossip is not None:
            await self.gossip.close()
        g = GossipEndpoints(
            ident["node_id"],
            self.opts.advertise_addr,
            keys=ident.get("gossip"),
            on_keys=self._save_gossip_keys,
            request_sync=worker.request_sync,
            seeds=[m.rsplit(":", 1)[0] for m in ident.get("managers") or []],
        )
        worker.endpoints = g
        worker.on_assignment.append(g.on_assignment)
        worker.gossip_ack = lambda: g.gossip_ack
        self.gossip = g
        await g.start()

    def _save_gossip_keys(self, record: dict) -> None:
        """node.json (0600) keeps the ring, so a restarted node gossips before it reaches
        a manager."""
        if self.identity is None or self.identity.get("gossip") == record:
            return
        self.identity["gossip"] = dict(record)
        write_atomic(self._identity_path, json.dumps(self.identity).encode())

    # ---- certificates ---------------------------------------------------------------

    def cert_role(self) -> str | None:
        """The role our current certificate carries (None without one)."""
        try:
            creds = pki.NodeCredentials.load(self.certs)
            return creds.identity(pki.RootCA.load(self.certs)).role
        except (OSError, pki.PKIError):
            return None

    async def renew(self) -> str:
        """A new key and certificate from a manager, over the current mTLS channel, for the
        role the store holds now. Saved, then swapped into the live TLS contexts (the
        worker's client context, the manager's listening site). Returns the new role."""
        assert self.worker is not None and self.identity is not None
        key, csr = pki.new_key_and_csr()
        data = await self.worker.renew(csr)
        ca = pki.RootCA.load(self.certs).public()
        creds = pki.NodeCredentials(data["certificate"].encode(), key)
        ident = creds.identity(ca)  # trust, but verify: our CA, valid now, our key
        if ident.node_id != self.identity["node_id"]:
            raise pki.UntrustedCertificate(
                f"the manager renewed a certificate for node {ident.node_id}, not us"
            )
        creds.save(self.certs)
        if self._client_ctx is not None:
            pki.reload_credentials(self._client_ctx, creds.cert_pem, creds.key_pem)
        m = self.manager
        if m is not None and m.ssl_context is not None and ident.role == "manager":
            pki.reload_credentials(m.ssl_context, creds.cert_pem, creds.key_pem)
        log.info("certificate renewed: %s, valid until %s", ident.role, ident.not_after)
        return ident.role

    async def _renew_loop(self) -> None:
        """Renew at a random point of 50-80 % of the certificate's lifetime (swarmkit).
        Wakes at least hourly, so a clock jump or a long suspend is noticed."""
        rng = random.Random()
        when: dt.datetime | None = None
        while True:
            try:
                cert = pki.NodeCredentials.load(self.certs).cert_pem
                if when is None:
                    when = pki.renewal_time(cert, rng=rng)
                left = (when - dt.datetime.now(dt.UTC)).total_seconds()
                if left > 0:
                    await asyncio.sleep(min(left, 3600.0))
                    continue
                async with self._busy:
                    await self.renew()
                when = None
            except asyncio.CancelledError:
                raise
            except Exception as e:
                log.error("certificate renewal failed: %s; retrying in a minute", e)
                await asyncio.sleep(60.0)

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
                if self.cert_role() != "manager":
                    # Serving 2377 needs a manager certificate: the store says manager now,
                    # so a renewal returns one.
                    log.warning("promoted to manager: renewing the certificate")
                    if await self.renew() != "manager":
                        return  # the manager's store lags; retry on the next check
                log.warning("promoted to manager: starting the Raft node")
                ident["role"] = "manager"
                ident["raft_password"] = a["raft"]["password"]
                ident["raft_members"] = a["raft"]["members"]
                write_atomic(self._identity_path, json.dumps(ident).encode())
                await self._start_manager()
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
                # The CA key is a manager's; a worker keeps the CA certificate only.
                (self.certs / "swarm-root-ca.key").unlink(missing_ok=True)
                changed = True
            if role == "worker" and self.manager is None and self.cert_role() == "manager":
                # A demoted node must not keep a certificate that lets it pose as a manager.
                log.warning("demoted: renewing the certificate as a worker")
                await self.renew()
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
            spec = body.get("Spec") or {}
            if not isinstance(spec, dict):
                raise CommandError(400, "Spec", "Spec must be a SwarmSpec object")
            heartbeat = D.heartbeat_period_s(spec, "Spec.")
            # The CA, the tokens pinned to it, and our own manager certificate: we hold the
            # CA key, so no network is involved (docs/security.md, "How trust is established").
            cluster_id, node_id = D.new_id(), D.new_id()
            ca = pki.RootCA.generate(cluster_id)
            tokens = pki.new_tokens(ca.cert_pem)
            key, csr = pki.new_key_and_csr()
            cert = pki.issue_node_cert(ca, csr, node_id, "manager", cluster_id)
            shutil.rmtree(self.certs, ignore_errors=True)  # an earlier swarm's
            ca.save(self.certs)
            pki.NodeCredentials(cert, key).save(self.certs)
            self.identity = {
                "node_id": node_id,
                "cluster_id": cluster_id,
                "role": "manager",
                "managers": [f"{self.opts.advertise_addr}:{CONTROL_PORT}"],
                "raft_password": secrets.token_urlsafe(32),
            }
            try:
                await self._start_roles(
                    new_cluster=True, pools=pools, subnet_size=size, ca=ca, tokens=tokens
                )
            except BaseException:
                self.identity = None
                if self.worker is not None:
                    await self.worker.close()
                    self.worker = None
                if self.manager is not None:
                    await self.manager.close()
                    self.manager = None
                # pysyncobj wrote a journal for a cluster that never formed.
                self._drop_raft_files()
                shutil.rmtree(self.certs, ignore_errors=True)
                raise
            write_atomic(self._identity_path, json.dumps(self.identity).encode())
            if heartbeat is not None and self.manager is not None:
                # Right after init, before any node can join: no node sees the default.
                assert self.manager.store is not None
                await self.manager.store.submit(
                    {"op": "dispatcher_config", "heartbeat_period_s": heartbeat}
                )
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
            token = body.get("JoinToken")
            try:
                pki.parse_token(token)
            except pki.InvalidToken as e:
                raise CommandError(400, "JoinToken", str(e)) from None
            last_error = "no manager answered"
            for remote in remotes:
                target = remote if ":" in remote else f"{remote}:{CONTROL_PORT}"
                try:
                    got = await self._join_via(target, token)
                except (aiohttp.ClientError, TimeoutError, OSError) as e:
                    last_error = f"cannot reach manager {target}: {e}"
                    continue
                ca, creds, data = got
                shutil.rmtree(self.certs, ignore_errors=True)  # an earlier swarm's
                ca.save(self.certs)
                creds.save(self.certs)
                self.identity = {
                    "node_id": data["node_id"],
                    "cluster_id": data["cluster_id"],
                    "role": data["role"],
                    "managers": data["managers"],
                }
                if isinstance(data.get("gossip"), dict):
                    self.identity["gossip"] = {
                        "keys": list(data["gossip"].get("keys") or []),
                        "primary": data["gossip"].get("primary"),
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

    async def _join_via(
        self, target: str, token: str
    ) -> tuple[pki.RootCA, pki.NodeCredentials, dict]:
        """swarmkit's bootstrap: fetch the CA unverified, pin it with the token's digest,
        then (and only then) send the token and a CSR to a server that proves it is a
        manager of that CA. Returns the CA, our new credentials, and the join answer."""
        timeout = aiohttp.ClientTimeout(total=20)
        connector = aiohttp.TCPConnector(ssl=pki.ca_fetch_context())
        async with aiohttp.ClientSession(timeout=timeout, connector=connector) as s:
            async with s.get(f"https://{target}/cluster/ca") as resp:
                if resp.status != 200:
                    raise CommandError(
                        503, "RemoteAddrs", f"{target} has no swarm CA (HTTP {resp.status})"
                    )
                fetched = await resp.content.read(65536)
        try:
            ca_pem = pki.verify_ca_against_token(fetched, token)
        except pki.PKIError as e:
            # Nothing was sent: the token stays with us.
            raise CommandError(400, "JoinToken", f"{target}: {e}") from None
        ca = pki.RootCA.from_pem(ca_pem)
        key, csr = pki.new_key_and_csr()
        connector = aiohttp.TCPConnector(ssl=pki.bootstrap_context(ca))
        async with aiohttp.ClientSession(timeout=timeout, connector=connector) as s:
            async with s.post(
                f"https://{target}/cluster/join",
                json={
                    "token": token,
                    "csr": csr.decode(),
                    "hostname": self.opts.hostname,
                    "addr": self.opts.advertise_addr,
                },
            ) as resp:
                data = await resp.json(content_type=None)
                if resp.status != 200:
                    msg = data.get("message") if isinstance(data, dict) else data
                    raise CommandError(
                        400 if resp.status < 500 else 503,
                        "JoinToken" if resp.status == 403 else "RemoteAddrs",
                        f"{target} refused the join: {msg}",
                    )
        creds = pki.NodeCredentials(str(data.get("certificate", "")).encode(), key)
        try:
            ident = creds.identity(ca)  # trust, but verify
        except pki.PKIError as e:
            raise CommandError(
                503, "RemoteAddrs", f"{target} returned a certificate we cannot use: {e}"
            ) from None
        if ident.node_id != data.get("node_id") or ident.role != data.get("role"):
            raise CommandError(
                503, "RemoteAddrs", f"{target} returned a certificate for another node or role"
            )
        return ca, creds, data

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
            if self.manager is not None:
                await self.manager.step_down()  # the cluster stops counting us in its quorum
            if self.gossip is not None:
                await self.gossip.close(leave=True)
                self.gossip = None
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
            if self._renew_task is not None:
                self._renew_task.cancel()
                self._renew_task = None
            self._identity_path.unlink(missing_ok=True)
            self._drop_raft_files()
            shutil.rmtree(self.certs, ignore_errors=True)
            self.identity = None

    # ---- info -----------------------------------------------------------------------

    def swarm_header(self) -> str:
        if self.identity is None:
            return "inactive"
        return f"active/{self.identity['role']}"


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
    # Every file the agent writes is private by default: the Raft journal and dump hold the
    # CA key and the join tokens, node.json and certificates/ the node's identity. Files
    # meant to be shared (the API socket) are chmod'ed explicitly; tasks get umask 022 back.
    os.umask(0o077)
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
