"""The manager role: the Raft store, the node channel on 2377, and the leader's loops.

Node channel (nodes <-> managers), HTTPS on the manager's advertise address, port 2377,
TLS 1.3 with the manager's node certificate (docs/security.md):
- ``GET  /cluster/ca``          the cluster CA certificate (PEM). Public, unauthenticated: a
  joining node checks it against the digest in its token before sending anything.
- ``POST /cluster/join``        {token, csr, hostname, addr} -> {node_id, role, cluster_id,
  certificate, ca, managers} (+ ``raft_password`` and ``raft_members`` for the manager token:
  safe, the joining node has pinned the CA and checked that we hold a manager certificate).
  Authenticated by the token; the node has no certificate yet.
- ``POST /cluster/renew``       {csr} -> {certificate, role}: a new certificate for the
  caller's node id and the role the store holds now (expiry, promotion, demotion).
- ``GET  /cluster/assignments`` ?index=N, long poll: the node's tasks, their networks and
  the endpoints of those networks (this slice's stand-in for gossip, issue 5), plus the
  manager list and the leader's address: workers follow the leader (it alone tracks
  heartbeats) and fail over to any other manager
- ``POST /cluster/status``      {statuses: [{id, state, err, pid}]}
- ``POST /cluster/ipsec``       {esp, epoch, applied, counters}: a node's IPsec report
  (swarmnet.ipsec.control; key sets themselves travel only in assignments)
Every path but the first two requires a client certificate from the cluster CA, checked on
every request (``pki.authorize_peer``): revocation by ``node rm`` bites keep-alive
connections too. The node id comes from the verified certificate, never from the request.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import secrets
import ssl
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from aiohttp import web

from swarmnet import pki
from swarmnet.api.docker import join_token, new_id
from swarmnet.assignment import assignment_for, gossip_digest, gossip_for
from swarmnet.ipsec.control import IpsecDriver, ipsec_status
from swarmnet.orchestrator import scheduler
from swarmnet.raft.state import ClusterState
from swarmnet.raft.store import RaftConfig, Store, StoreError

log = logging.getLogger(__name__)

CONTROL_PORT = 2377


@dataclass(frozen=True)
class ManagerConfig:
    # Long-poll hold time, and so the worker's heartbeat period: a node counts as seen only
    # when a poll arrives or returns, so this must stay well under node_down_after_s (at 15 s
    # every idle node was marked down after 10 s and its tasks rescheduled). Docker: 5 s.
    assignment_poll_s: float = 5.0
    node_down_after_s: float = 10.0  # no poll for this long -> node Down (Docker: ~13 s measured)
    leader_loop_s: float = 1.0  # periodic pass even without changes (heartbeats, retries)


def now_iso() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


# Paths a node without a certificate may call: the CA fetch and the join (the token
# authenticates it). Everything else needs a valid, unrevoked node certificate.
OPEN_PATHS = {("GET", "/cluster/ca"), ("POST", "/cluster/join")}
# The verified caller, set by the authentication middleware.
PEER = web.RequestKey("peer", pki.NodeIdentity)


def certs_dir(data_dir: Path) -> Path:
    """Where a node keeps its CA certificate, key and certificate (swarmkit's layout)."""
    return data_dir / "certificates"


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"message": message}, status=status)


GOSSIP_PORT = 7946  # swarmnet.gossip_endpoints.GOSSIP_PORT (Docker's gossip port)


@dataclass(frozen=True)
class GossipRotationConfig:
    step_timeout_s: float = 60.0  # every ready node must acknowledge a step within this
    poll_s: float = 0.1  # how often the leader looks at the acknowledgements


def new_gossip_key() -> str:
    """A 32-byte AES-256-GCM key for memberlist's keyring, base64 as serf takes it."""
    return base64.b64encode(secrets.token_bytes(32)).decode()


class Manager:
    def __init__(
        self,
        node_id: str,
        hostname: str,
        addr: str,
        data_dir: Path,
        config: ManagerConfig | None = None,
        raft: RaftConfig | None = None,
    ):
        self.node_id = node_id
        self.hostname = hostname
        self.addr = addr
        self.data_dir = data_dir
        self.config = config or ManagerConfig()
        self.raft_config = raft or RaftConfig()
        self.store: Store | None = None
        self._runner: web.AppRunner | None = None
        self._tasks: list[asyncio.Task] = []
        self._last_seen: dict[str, float] = {}
        self.gossip_acks: dict[str, str] = {}  # node id -> digest of the gossip ring it runs
        self._leader_since: float | None = None
        self._confirmed_term: int | None = None
        self._password = ""
        self._kick = asyncio.Event()
        self.ipsec = IpsecDriver()  # encrypted overlays' key schedule (leader pass, reports)
        # The TLS context of the listening site; kept so a renewal can swap its credentials.
        self.ssl_context: ssl.SSLContext | None = None

    # ---- lifecycle ------------------------------------------------------------------

    def raft_addr(self, addr: str) -> str:
        return f"{addr}:{self.raft_config.raft_port}"

    async def start(self, password: str, partners: list[str], wait_leader: bool = False) -> None:
        """Start the Raft node and the node channel. Without ``wait_leader`` the manager serves
        reads at once, even without quorum (a restarted manager alone must still answer)."""
        self._password = password
        self.store = Store(
            f"{self.addr}:{self.raft_config.raft_port}",
            partners,
            self.data_dir / "raft",
            password,
            self.raft_config,
        )
        self.store.on_change(self._kick.set)
        if wait_leader:
            await self.store.wait_leader()
        certs = certs_dir(self.data_dir)
        creds = pki.NodeCredentials.load(certs)
        # Raises (RoleRejected, Expired...) for a worker or expired certificate: a node
        # must not serve 2377 unless it holds a valid manager certificate.
        self.ssl_context = pki.server_context(
            pki.RootCA.load(certs).public(),
            creds.cert_pem,
            creds.key_pem,
            require_client_cert=False,
        )
        app = web.Application(client_max_size=1 << 20, middlewares=[self._authn])
        app.router.add_get("/cluster/ca", self._h_ca)
        app.router.add_post("/cluster/join", self._h_join)
        app.router.add_post("/cluster/renew", self._h_renew)
        app.router.add_get("/cluster/assignments", self._h_assignments)
        app.router.add_post("/cluster/status", self._h_status)
        app.router.add_post("/cluster/ipsec", self._h_ipsec)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(
            self._runner,
            self.addr,
            CONTROL_PORT,
            reuse_address=True,
            ssl_context=self.ssl_context,
        )
        await site.start()
        self._tasks.append(asyncio.create_task(self._leader_loop(), name="leader-loop"))

    async def init_cluster(
        self,
        ca: pki.RootCA,
        tokens: dict[str, str],
        pools: list[str] | None,
        subnet_size: int | None,
    ) -> dict:
        """Commit the cluster record with this node as its first manager. ``ca`` holds its
        key (``swarm init`` made it); ``tokens`` are ``pki.new_tokens(ca.cert_pem)``."""
        assert self.store is not None and ca.key_pem is not None
        cmd = {
            "op": "init",
            "cluster_id": ca.cluster_id,
            # The record keeps each token's secret and the CA digest once (as before).
            "tokens": {role: pki.parse_token(t).secret for role, t in tokens.items()},
            "digest": ca.digest,
            "ca_cert": ca.cert_pem.decode(),
            "ca_key": ca.key_pem.decode(),
            "pools": pools,
            "subnet_size": subnet_size,
            "gossip_key": new_gossip_key(),
            "now": now_iso(),
            "node": {
                "node_id": self.node_id,
                "hostname": self.hostname,
                "addr": self.addr,
                "role": "manager",
            },
        }
        return await self.store.submit(cmd)

    def kick(self) -> None:
        """Run the leader's pass now (after a write that changes what should run)."""
        self._kick.set()

    async def close(self) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._runner is not None:
            await self._runner.cleanup()
        if self.store is not None:
            await self.store.aclose()

    # ---- reads for the API ----------------------------------------------------------

    def tokens(self) -> dict[str, str]:
        assert self.store is not None

        def get(state: ClusterState) -> dict[str, str]:
            c = state.cluster
            if c is None:
                return {}
            return {role: join_token(c["digest"], s) for role, s in c["tokens"].items()}

        return self.store.read(get)

    def manager_status(self) -> dict[str, str]:
        """node id -> "reachable"/"unreachable" for every manager node, from pysyncobj's
        connection status to each Raft partner (this manager itself: reachable)."""
        assert self.store is not None
        members = self.store.members()
        port = self.raft_config.raft_port

        def get(state: ClusterState) -> dict[str, str]:
            return {
                n["id"]: "reachable" if members.get(f"{n['addr']}:{port}") else "unreachable"
                for n in state.nodes.values()
                if n["role"] == "manager"
            }

        return self.store.read(get)

    def control_addrs(self) -> tuple[list[str], str | None]:
        """Every manager's node-channel address (the leader first) and the leader's."""
        assert self.store is not None
        leader = self.store.leader()
        lhost = None if leader is None else leader.rsplit(":", 1)[0]
        addrs = self.store.read(
            lambda s: sorted(n["addr"] for n in s.nodes.values() if n["role"] == "manager")
        )
        addrs.sort(key=lambda a: a != lhost)
        lead = f"{lhost}:{CONTROL_PORT}" if lhost in addrs else None
        return [f"{a}:{CONTROL_PORT}" for a in addrs], lead

    def raft_members(self) -> list[str]:
        assert self.store is not None
        return self.store.read(
            lambda s: sorted(
                self.raft_addr(n["addr"]) for n in s.nodes.values() if n["role"] == "manager"
            )
        )

    def leader_node_id(self) -> str | None:
        # The leader is the manager node whose address the Raft leader's address carries.
        assert self.store is not None
        leader = self.store.leader()
        if leader is None:
            return None
        host = leader.rsplit(":", 1)[0]

        def find(state: ClusterState) -> str | None:
            for n in state.nodes.values():
                if n["role"] == "manager" and n["addr"] == host:
                    return n["id"]
            return None

        return self.store.read(find)

    # ---- node channel ---------------------------------------------------------------

    def _cluster(self) -> dict | None:
        """A copy of the cluster record (CA, tokens, revocation list), or None before init."""
        assert self.store is not None
        return self.store.read(
            lambda s: (
                None if s.cluster is None else dict(s.cluster, tokens=dict(s.cluster["tokens"]))
            )
        )

    @web.middleware
    async def _authn(self, request: web.Request, handler) -> web.StreamResponse:
        """Every request but the CA fetch and the join: a verified, unrevoked certificate of
        this cluster. Checked per request, not per connection, so that ``node rm`` stops a
        keep-alive connection at its next request."""
        if (request.method, request.path) in OPEN_PATHS:
            return await handler(request)
        cluster = self._cluster()
        if cluster is None:
            return _error(503, "this manager has no swarm")
        transport = request.transport
        try:
            ident = pki.authorize_peer(
                None if transport is None else transport.get_extra_info("ssl_object"),
                revoked=pki.RevocationList.from_json(cluster.get("revoked")),
                cluster_id=cluster["id"],
            )
        except pki.CertificateRejected as e:
            log.warning(
                "node channel: %s %s refused from %s: %s",
                request.method,
                request.path,
                request.remote,
                e,
            )
            return _error(pki.http_status(e), str(e))
        request[PEER] = ident
        return await handler(request)

    @staticmethod
    def _node_id(request: web.Request) -> str:
        return request[PEER].node_id

    def _signing_ca(self, cluster: dict) -> pki.RootCA:
        """The CA with its key, from the replicated record: every manager can sign, a
        promoted one included, without a copy of the key on its disk."""
        return pki.RootCA(cluster["ca_cert"].encode(), cluster["ca_key"].encode())

    async def _h_ca(self, request: web.Request) -> web.Response:
        cluster = self._cluster()
        if cluster is None or not cluster.get("ca_cert"):
            return _error(503, "this manager has no swarm")
        return web.Response(text=cluster["ca_cert"], content_type="application/x-pem-file")

    async def _h_join(self, request: web.Request) -> web.Response:
        assert self.store is not None
        try:
            body = await request.json()
        except Exception:
            return _error(400, "the body must be a JSON object")
        if not isinstance(body, dict):
            return _error(400, "the body must be a JSON object")
        cluster = self._cluster()
        if cluster is None:
            return _error(503, "this manager has no swarm")
        try:
            pki.parse_token(body.get("token"))
        except pki.InvalidToken as e:
            return _error(400, str(e))
        tokens = {r: join_token(cluster["digest"], s) for r, s in cluster["tokens"].items()}
        try:
            role = pki.role_for_token(body.get("token"), tokens)
        except (pki.InvalidToken, pki.CAPinMismatch) as e:
            log.warning("join refused from %s: wrong token", request.remote)
            return _error(403, str(e))
        hostname = str(body.get("hostname") or "")[:64]
        addr = str(body.get("addr") or request.remote or "")
        node_id = new_id()
        try:
            certificate = pki.issue_node_cert(
                self._signing_ca(cluster), body.get("csr"), node_id, role, cluster["id"]
            )
        except pki.InvalidCSR as e:
            return _error(400, f"csr: {e}")
        try:
            result = await self.store.submit(
                {
                    "op": "add_node",
                    "node_id": node_id,
                    "hostname": hostname,
                    "addr": addr,
                    "role": role,
                    "now": now_iso(),
                }
            )
        except StoreError as e:
            return web.json_response({"message": e.message}, status=e.status)
        if "error" in result:
            return web.json_response(
                {"message": result["error"]["message"]}, status=result["error"]["status"]
            )
        self._last_seen[node_id] = time.monotonic()
        # A new manager becomes a Raft member through the leader's membership pass (one
        # change at a time); it starts its own Raft node with every manager as a partner.
        self._kick.set()
        managers, _ = self.control_addrs()
        out = {
            "node_id": node_id,
            "role": role,
            "cluster_id": cluster["id"],
            "certificate": certificate.decode(),
            "ca": cluster["ca_cert"],
            "managers": managers,
            "gossip": self.store.read(gossip_for),
        }
        if role == "manager":
            out["raft_password"] = self._password
            out["raft_members"] = self.raft_members()
        return web.json_response(out)

    async def _h_renew(self, request: web.Request) -> web.Response:
        """A new certificate for the caller's node id, in the role the store holds NOW: how
        promotion and demotion reach the certificate, and how a node outlives 90 days."""
        assert self.store is not None
        node_id = self._node_id(request)
        try:
            body = await request.json()
        except Exception:
            return _error(400, "the body must be a JSON object")
        cluster = self._cluster()
        role = self.store.read(lambda s: (s.nodes.get(node_id) or {}).get("role"))
        if cluster is None or role is None:
            return _error(403, f"node {node_id} is not part of this swarm")
        try:
            certificate = pki.issue_node_cert(
                self._signing_ca(cluster),
                body.get("csr") if isinstance(body, dict) else None,
                node_id,
                role,
                cluster["id"],
            )
        except pki.InvalidCSR as e:
            return _error(400, f"csr: {e}")
        log.info("renewed the certificate of node %s (%s)", node_id, role)
        return web.json_response({"certificate": certificate.decode(), "role": role})

    async def _h_assignments(self, request: web.Request) -> web.Response:
        assert self.store is not None
        node_id = self._node_id(request)
        self._seen(node_id)
        ack = request.query.get("gossip")
        if ack:
            self.gossip_acks[node_id] = ack[:64]
        try:
            since = int(request.query.get("index", "-1"))
        except ValueError:
            since = -1
        deadline = time.monotonic() + self.config.assignment_poll_s
        while self.store.index <= since and time.monotonic() < deadline:
            await self.store.wait_change(max(0.0, deadline - time.monotonic()))
            self._seen(node_id)
        self._seen(node_id)
        out = self.store.read(lambda s: assignment_for(s, node_id))
        out["gossip"] = self.store.read(gossip_for)
        out["managers"], out["leader"] = self.control_addrs()
        if out["node"] is not None and out["node"]["role"] == "manager":
            # A promoted node needs the cluster secret and the members to start its Raft node.
            out["raft"] = {"password": self._password, "members": self.raft_members()}
        return web.json_response(out)

    async def _h_ipsec(self, request: web.Request) -> web.Response:
        """A node's IPsec report (swarmnet.ipsec.control.parse_report); the node is the
        certificate's, never the body's."""
        assert self.store is not None
        try:
            await self.ipsec.report(self.store, self._node_id(request), await request.json())
        except ValueError as e:
            return _error(400, str(e))
        except StoreError as e:
            return web.json_response({"message": e.message}, status=e.status)
        return web.json_response({"ok": True})

    def ipsec_status(self) -> dict:
        """The key schedule without key material (``swarmnet swarm ipsec``)."""
        assert self.store is not None
        return self.store.read(lambda s: ipsec_status(s, self.ipsec.cfg))

    async def _h_status(self, request: web.Request) -> web.Response:
        assert self.store is not None
        node_id = self._node_id(request)
        self._seen(node_id)
        body = await request.json()
        statuses = [
            {k: st[k] for k in ("id", "state", "err", "pid") if k in st}
            for st in body.get("statuses", [])
            if isinstance(st, dict)
            and isinstance(st.get("id"), str)
            and isinstance(st.get("state"), str)
        ]
        if statuses:
            try:
                await self.store.submit(
                    {
                        "op": "task_status",
                        "node_id": node_id,
                        "statuses": statuses,
                        "now": now_iso(),
                    }
                )
            except StoreError as e:
                return web.json_response({"message": e.message}, status=e.status)
        return web.json_response({"ok": True})

    def _seen(self, node_id: str) -> None:
        first = node_id not in self._last_seen
        self._last_seen[node_id] = time.monotonic()
        if first or self.store.read(lambda s: (s.nodes.get(node_id) or {}).get("state")) == "down":
            self._kick.set()

    # ---- leader duties --------------------------------------------------------------

    async def _leader_loop(self) -> None:
        assert self.store is not None
        while True:
            # asyncio.timeout, not wait_for: on Python 3.11 wait_for can swallow a
            # cancellation that races with the event firing, and close() then hangs.
            try:
                async with asyncio.timeout(self.config.leader_loop_s):
                    await self._kick.wait()
            except TimeoutError:
                pass
            self._kick.clear()
            if not self.store.is_leader():
                self._leader_since = None
                self._confirmed_term = None
                continue
            try:
                term = self.store.term
                if self._confirmed_term != term:
                    # pysyncobj's "leader" may be deposed without knowing it (RESULTS 1.6):
                    # act only once a no-op of this term has committed.
                    if not await self.store.confirm_leadership():
                        continue
                    log.info("leadership confirmed (term %d)", term)
                    self._confirmed_term = term
                    self._leader_since = time.monotonic()
                await self._membership_pass()
                await self._leader_pass()
                await self.ipsec.step(self.store)
            except StoreError as e:
                log.warning("leader pass: %s", e.message)
                await asyncio.sleep(0.2)
            except Exception:
                log.exception("leader pass failed")
                await asyncio.sleep(0.5)

    async def _membership_pass(self) -> None:
        """Make the Raft membership follow the manager nodes of the state, one change at a
        time, each waited for (pysyncobj does not stop concurrent changes, RESULTS 1.5).
        Level-triggered, so a change interrupted by a leader change is finished by the next."""
        assert self.store is not None
        want = set(self.raft_members())
        have = set(self.store.members())
        me = self.store.self_addr
        for addr in sorted(want - have):
            log.info("adding manager %s to the Raft cluster", addr)
            await self.store.add_member(addr)
            self._kick.set()  # next change on the next pass
            return
        for addr in sorted(have - want):
            if addr == me:
                # pysyncobj cannot remove the leader itself: hand leadership over first.
                log.info("this manager was demoted: transferring leadership")
                self.store.transfer_leadership()
                return
            log.info("removing manager %s from the Raft cluster", addr)
            await self.store.remove_member(addr)
            self._kick.set()
            return

    # ---- gossip key rotation (leader) ---------------------------------------------------

    async def rotate_gossip_key(self, cfg: GossipRotationConfig | None = None) -> dict:
        """memberlist's rotation without a partition: install the new key everywhere, then
        make it the primary everywhere, then remove the old one. Each step is one record;
        the next is committed only when every ready node has acknowledged the previous one
        (nodes poll the leader, so the acknowledgements are here). A node that does not
        acknowledge in time stops the rotation at a safe step (both keys accepted)."""
        assert self.store is not None
        cfg = cfg or GossipRotationConfig()
        if not self.store.is_leader():
            raise StoreError(503, "rotate the gossip key on the leader (nodes report to it)")
        ring = self.store.read(lambda s: (s.cluster or {}).get("gossip"))
        if not ring:
            raise StoreError(503, "this swarm has no gossip key ring")
        old, new = ring["primary"], new_gossip_key()
        steps = [
            {"keys": [old, new], "primary": old},  # install
            {"keys": [old, new], "primary": new},  # use
            {"keys": [new], "primary": new},  # remove
        ]
        for i, step in enumerate(steps):
            result = await self.store.submit({"op": "gossip_keys", **step, "now": now_iso()})
            if "error" in result:
                return result
            want = gossip_digest(step)
            deadline = time.monotonic() + cfg.step_timeout_s
            while True:
                ready = self.store.read(
                    lambda s: [n["id"] for n in s.nodes.values() if n["state"] == "ready"]
                )
                late = [n for n in ready if self.gossip_acks.get(n) != want]
                if not late:
                    break
                if time.monotonic() > deadline:
                    raise StoreError(
                        503,
                        f"gossip key rotation stopped after step {i + 1} of 3: nodes "
                        f"{', '.join(sorted(late))} did not take the new ring",
                    )
                await asyncio.sleep(cfg.poll_s)
            log.info("gossip key rotation: step %d of 3 done", i + 1)
        return {"ok": True}

    # ---- node changes (API) -----------------------------------------------------------

    async def update_node(self, node_id: str, version: int | None, spec: dict) -> dict:
        assert self.store is not None
        cmd: dict = {"op": "node_update", "node_id": node_id, "version": version, "now": now_iso()}
        if "Role" in spec:
            cmd["role"] = spec["Role"]
        if "Availability" in spec:
            cmd["availability"] = spec["Availability"]
        result = await self.store.submit(cmd)
        self._kick.set()
        return result

    async def step_down(self, timeout_s: float = 10.0) -> bool:
        """Before ``swarm leave --force`` on a manager: demote ourselves, so that the leader's
        membership pass drops our Raft address and the quorum shrinks with us. Otherwise
        the cluster would keep counting an absent member (4 members with one gone leave no
        room for another failure; 3 do). The removal itself needs only the remaining
        members, so we need not wait for it. Best effort: the last manager, or one without
        quorum, leaves anyway (that is what --force says)."""
        if self.store is None or len(self.store.members()) <= 1:
            return False
        try:
            async with asyncio.timeout(timeout_s):
                result = await self.update_node(self.node_id, None, {"Role": "worker"})
        except (TimeoutError, StoreError) as e:
            log.warning("leave: could not step down from the Raft cluster: %s", e)
            return False
        if "error" in result:
            log.warning("leave: could not step down: %s", result["error"].get("message"))
            return False
        log.info("left the manager set; the leader removes our Raft address")
        return True

    async def remove_node(self, node_id: str, force: bool) -> dict:
        assert self.store is not None
        result = await self.store.submit(
            {"op": "remove_node", "node_id": node_id, "force": force, "now": now_iso()}
        )
        self._last_seen.pop(node_id, None)
        self._kick.set()
        return result

    def node_down_after_s(self) -> float:
        """Two heartbeat periods of the swarm's spec (``--dispatcher-heartbeat``), or the
        configured default."""
        assert self.store is not None
        hb = self.store.read(
            lambda s: ((s.cluster or {}).get("dispatcher") or {}).get("heartbeat_period_s")
        )
        return 2.0 * float(hb) if hb else self.config.node_down_after_s

    async def _leader_pass(self) -> None:
        assert self.store is not None
        mono = time.monotonic()
        nodes = self.store.read(lambda s: [(n["id"], n["state"]) for n in s.nodes.values()])
        down_after = self.node_down_after_s()
        for nid, state in nodes:
            seen = self._last_seen.get(nid)
            if seen is None:
                # A new leader gives every node a full window before declaring it down.
                self._last_seen[nid] = seen = self._leader_since or mono
            alive = mono - seen < down_after
            if state == "ready" and not alive:
                log.warning("node %s missed heartbeats: marking it down", nid)
                await self.store.submit(
                    {"op": "node_state", "node_id": nid, "state": "down", "now": now_iso()}
                )
            elif state == "down" and alive:
                await self.store.submit(
                    {"op": "node_state", "node_id": nid, "state": "ready", "now": now_iso()}
                )
        cmds = self.store.read(lambda s: scheduler.plan(s, new_id, now_iso()))
        for cmd in cmds:
            result = await self.store.submit(cmd)
            if "error" in result:
                log.warning(
                    "scheduler command %s refused: %s", cmd["op"], result["error"]["message"]
                )


__all__ = ["Manager", "ManagerConfig", "assignment_for"]
