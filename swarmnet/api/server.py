"""The agent's HTTP API: the Docker Engine API paths and shapes that swarm mode uses.

Served on a unix socket by default (DESIGN "Ports"): local users only. Every path is also
accepted under a ``/v1.NN`` prefix, as the docker CLI sends it. Errors are
``{"message": ...}`` with 4xx for bad input (the message names the field), 404 for unknown
objects, 409 for conflicts and 503 where Docker says "not a swarm manager".
"""

from __future__ import annotations

import json
import logging
from typing import TYPE_CHECKING, Any

from aiohttp import web

from swarmnet import agent_report as report
from swarmnet.api import docker as D
from swarmnet.pki import new_secret
from swarmnet.raft.state import ClusterState, CommandError
from swarmnet.raft.store import StoreError

if TYPE_CHECKING:
    from swarmnet.agent import Agent

log = logging.getLogger(__name__)

NOT_MANAGER = (
    "This node is not a swarm manager. Use \"swarmnet swarm init\" or \"swarmnet swarm join\" "
    "to connect this node to swarm and try again."
)


def err(status: int, message: str) -> web.Response:
    # Exactly "application/json", no charset: the docker CLI decodes an error body only
    # when the Content-Type header equals that string, and prints raw JSON otherwise.
    return web.Response(
        body=json.dumps({"message": message}).encode(),
        status=status,
        headers={"Content-Type": "application/json"},
    )


@web.middleware
async def errors_middleware(request: web.Request, handler):
    try:
        resp = await handler(request)
    except CommandError as e:
        resp = err(e.status, e.message if e.field in e.message else f"{e.field}: {e.message}")
    except StoreError as e:
        resp = err(e.status, e.message)
    except web.HTTPException as e:
        if e.status >= 400 and e.content_type != "application/json":
            resp = err(e.status, e.text or e.reason)
        else:
            raise
    except json.JSONDecodeError as e:
        resp = err(400, f"body: invalid JSON: {e}")
    except Exception:
        log.exception("API handler failed: %s %s", request.method, request.path)
        resp = err(500, "internal error; see the agent log")
    resp.headers["Api-Version"] = D.API_VERSION
    resp.headers["Ostype"] = "linux"
    resp.headers["Server"] = f"Docker/{D.ENGINE_VERSION} (linux)"
    return resp


async def _json(request: web.Request) -> Any:
    if not request.can_read_body:
        return {}
    raw = await request.read()
    if not raw.strip():
        return {}
    try:
        body = json.loads(raw)
        # Lone surrogates ("\\ud800") are valid JSON but cannot be UTF-8 encoded, so
        # msgpack would fail on them later, inside a Raft submit: refuse them here.
        json.dumps(body, ensure_ascii=False).encode()
    except (ValueError, RecursionError) as e:  # bad JSON, bad UTF-8, surrogates, nesting
        raise CommandError(400, "body", f"body: invalid JSON: {e}") from None
    return body


def _lookup(objs: dict[str, dict], key: str, name_of, kind: str) -> dict:
    if key in objs:
        return objs[key]
    by_name = [o for o in objs.values() if name_of(o) == key]
    if len(by_name) == 1:
        return by_name[0]
    by_prefix = [o for i, o in objs.items() if i.startswith(key)]
    if len(by_prefix) == 1:
        return by_prefix[0]
    if len(by_prefix) > 1:
        raise CommandError(400, "id", f"{kind} {key} is ambiguous ({len(by_prefix)} matches)")
    raise CommandError(404, "id", f"{kind} {key} not found")


def _filters(request: web.Request) -> dict[str, list[str]]:
    raw = request.query.get("filters")
    if not raw:
        return {}
    try:
        f = json.loads(raw)
    except ValueError:
        raise CommandError(400, "filters", "filters must be JSON") from None
    out: dict[str, list[str]] = {}
    if not isinstance(f, dict):
        raise CommandError(400, "filters", "filters must be a JSON object")
    for k, v in f.items():
        vals = list(v.keys()) if isinstance(v, dict) else v if isinstance(v, list) else [v]
        out[k] = [str(x) for x in vals]  # matched with `in`/startswith on strings
    return out


class API:
    def __init__(self, agent: Agent):
        self.agent = agent

    # ---- helpers ----------------------------------------------------------------------

    def _manager(self):
        m = self.agent.manager
        if m is None or m.store is None:
            raise CommandError(503, "swarm", NOT_MANAGER)
        return m

    def _read(self, fn):
        return self._manager().store.read(fn)

    async def _submit(self, cmd: dict) -> dict:
        result = await self._manager().store.submit(cmd)
        if "error" in result:
            e = result["error"]
            raise CommandError(e["status"], e["field"], e["message"])
        return result

    # ---- system -----------------------------------------------------------------------

    async def ping(self, request: web.Request) -> web.Response:
        resp = web.Response(text="OK" if request.method == "GET" else "")
        resp.headers["Cache-Control"] = "no-cache, no-store, must-revalidate"
        resp.headers["Pragma"] = "no-cache"
        resp.headers["Swarm"] = self.agent.swarm_header()
        return resp

    async def version(self, request: web.Request) -> web.Response:
        return web.json_response(
            {
                "Version": D.ENGINE_VERSION,
                "ApiVersion": D.API_VERSION,
                "MinAPIVersion": D.API_MIN_VERSION,
                "Os": "linux",
                "Arch": "amd64",
                "Components": [{"Name": "swarmnet", "Version": D.ENGINE_VERSION}],
            }
        )

    async def info(self, request: web.Request) -> web.Response:
        return web.json_response(report.info(self.agent))

    # ---- swarm ------------------------------------------------------------------------

    async def swarm_get(self, request: web.Request) -> web.Response:
        m = self._manager()

        def get(s: ClusterState) -> dict:
            c = s.cluster
            assert c is not None
            return {
                "ID": c["id"],
                "Version": {"Index": c["version"]},
                "CreatedAt": c["created"],
                "UpdatedAt": c["updated"],
                "Spec": {
                    "Name": "default",
                    "Labels": {},
                    "Dispatcher": {
                        "HeartbeatPeriod": int(
                            float((c.get("dispatcher") or {}).get("heartbeat_period_s", 5.0)) * 1e9
                        )
                    },
                },
                "DefaultAddrPool": c["pools"],
                "SubnetSize": c["subnet_size"],
                "DataPathPort": 4789,
            }

        out = self._read(get)
        tokens = m.tokens()
        out["JoinTokens"] = {"Worker": tokens.get("worker"), "Manager": tokens.get("manager")}
        return web.json_response(out)

    async def swarm_init(self, request: web.Request) -> web.Response:
        body = await _json(request)
        node_id = await self.agent.init_swarm(body if isinstance(body, dict) else {})
        return web.json_response(node_id)

    async def swarm_join(self, request: web.Request) -> web.Response:
        body = await _json(request)
        await self.agent.join_swarm(body if isinstance(body, dict) else {})
        return web.Response(status=200)

    async def swarm_update(self, request: web.Request) -> web.Response:
        self._manager()
        spec = await _json(request)  # the docker CLI sends the whole SwarmSpec
        period = D.heartbeat_period_s(spec if isinstance(spec, dict) else {}, "")
        if period is not None:
            await self._submit({"op": "dispatcher_config", "heartbeat_period_s": period})
        for role in ("worker", "manager"):
            if request.query.get(f"rotate{role.capitalize()}Token") in ("1", "true", "True"):
                await self._submit(
                    {"op": "rotate_token", "role": role, "secret": new_secret(), "now": _now()}
                )
        return web.Response(status=200)

    async def swarm_leave(self, request: web.Request) -> web.Response:
        force = request.query.get("force") in ("1", "true", "True")
        await self.agent.leave_swarm(force)
        return web.Response(status=200)

    # ---- nodes ------------------------------------------------------------------------

    async def nodes_list(self, request: web.Request) -> web.Response:
        m = self._manager()
        leader = m.leader_node_id()
        status = m.manager_status()
        nodes = self._read(lambda s: [dict(n) for n in s.nodes.values()])
        nodes.sort(key=lambda n: n["hostname"])
        return web.json_response(
            [D.render_node(n, leader, status.get(n["id"]) != "unreachable") for n in nodes]
        )

    async def node_get(self, request: web.Request) -> web.Response:
        m = self._manager()
        key = request.match_info["id"]
        node = self._read(lambda s: dict(_lookup(s.nodes, key, lambda n: n["hostname"], "node")))
        reachable = m.manager_status().get(node["id"]) != "unreachable"
        return web.json_response(D.render_node(node, m.leader_node_id(), reachable))

    async def node_update(self, request: web.Request) -> web.Response:
        """POST /nodes/{id}/update?version=N with a NodeSpec (Role, Availability, Labels)."""
        m = self._manager()
        key = request.match_info["id"]
        try:
            version = int(request.query["version"])
        except (KeyError, ValueError):
            raise CommandError(400, "version", "version: the node's Version.Index is required") from None
        spec = await _json(request)
        if not isinstance(spec, dict):
            raise CommandError(400, "Spec", "the body must be a NodeSpec object")
        node_id = self._read(lambda s: _lookup(s.nodes, key, lambda n: n["hostname"], "node")["id"])
        result = await m.update_node(node_id, version, spec)
        if "error" in result:
            e = result["error"]
            raise CommandError(e["status"], e["field"], e["message"])
        return web.Response(status=200)

    async def node_delete(self, request: web.Request) -> web.Response:
        m = self._manager()
        key = request.match_info["id"]
        force = request.query.get("force") in ("1", "true", "True")
        node_id = self._read(lambda s: _lookup(s.nodes, key, lambda n: n["hostname"], "node")["id"])
        result = await m.remove_node(node_id, force)
        if "error" in result:
            e = result["error"]
            raise CommandError(e["status"], e["field"], e["message"])
        return web.Response(status=200)

    # ---- networks ---------------------------------------------------------------------

    async def networks_list(self, request: web.Request) -> web.Response:
        nets = self._read(lambda s: [dict(n) for n in s.networks.values()])
        flt = _filters(request)
        if "name" in flt:
            nets = [n for n in nets if any(f in n["name"] for f in flt["name"])]
        if "id" in flt:
            nets = [n for n in nets if any(n["id"].startswith(f) for f in flt["id"])]
        nets.sort(key=lambda n: n["name"])
        return web.json_response([D.render_network(n) for n in nets])

    async def network_get(self, request: web.Request) -> web.Response:
        key = request.match_info["id"]
        net = self._read(lambda s: dict(_lookup(s.networks, key, lambda n: n["name"], "network")))
        return web.json_response(D.render_network(net))

    async def network_create(self, request: web.Request) -> web.Response:
        self._manager()
        fields = D.parse_network_create(await _json(request))
        nid = D.new_id()
        await self._submit({"op": "create_network", "id": nid, "now": _now(), **fields})
        return web.json_response({"Id": nid, "Warning": ""}, status=201)

    async def network_delete(self, request: web.Request) -> web.Response:
        key = request.match_info["id"]
        nid = self._read(lambda s: _lookup(s.networks, key, lambda n: n["name"], "network")["id"])
        await self._submit({"op": "remove_network", "id": nid})
        return web.Response(status=204)

    # ---- services ---------------------------------------------------------------------

    def _resolve_network(self, state: ClusterState, key: str) -> str | None:
        try:
            return _lookup(state.networks, key, lambda n: n["name"], "network")["id"]
        except CommandError:
            return None

    async def services_list(self, request: web.Request) -> web.Response:
        flt = _filters(request)

        def get(s: ClusterState) -> list[dict]:
            out = []
            for svc in sorted(s.services.values(), key=lambda x: x["spec"]["Name"]):
                if "name" in flt and not any(f in svc["spec"]["Name"] for f in flt["name"]):
                    continue
                if "id" in flt and not any(svc["id"].startswith(f) for f in flt["id"]):
                    continue
                tasks = [t for t in s.tasks.values() if t["service_id"] == svc["id"]]
                out.append(D.render_service(svc, tasks))
            return out

        return web.json_response(self._read(get))

    async def service_get(self, request: web.Request) -> web.Response:
        key = request.match_info["id"]

        def get(s: ClusterState) -> dict:
            svc = _lookup(s.services, key, lambda x: x["spec"]["Name"], "service")
            tasks = [t for t in s.tasks.values() if t["service_id"] == svc["id"]]
            return D.render_service(svc, tasks)

        return web.json_response(self._read(get))

    async def service_create(self, request: web.Request) -> web.Response:
        self._manager()
        body = await _json(request)
        spec = self._read(lambda s: D.parse_service_spec(body, lambda k: self._resolve_network(s, k)))
        sid = D.new_id()
        await self._submit({"op": "create_service", "id": sid, "spec": spec, "now": _now()})
        self.agent.manager.kick()
        return web.json_response({"ID": sid, "Warnings": None}, status=201)

    async def service_update(self, request: web.Request) -> web.Response:
        key = request.match_info["id"]
        body = await _json(request)
        version = request.query.get("version")
        # ASCII digits only ("²".isdigit() is True but int() refuses it), and few enough
        # to fit the int64 that msgpack carries.
        if version is None or not (version.isascii() and version.isdigit()) or len(version) > 18:
            raise CommandError(400, "version", "the version query parameter (Version.Index) is required")

        def prep(s: ClusterState) -> tuple[str, dict]:
            svc = _lookup(s.services, key, lambda x: x["spec"]["Name"], "service")
            return svc["id"], D.parse_service_spec(body, lambda k: self._resolve_network(s, k))

        sid, spec = self._read(prep)
        await self._submit(
            {"op": "update_service", "id": sid, "version": int(version), "spec": spec, "now": _now()}
        )
        self.agent.manager.kick()
        return web.json_response({"Warnings": None})

    async def service_delete(self, request: web.Request) -> web.Response:
        key = request.match_info["id"]
        sid = self._read(lambda s: _lookup(s.services, key, lambda x: x["spec"]["Name"], "service")["id"])
        await self._submit({"op": "remove_service", "id": sid, "now": _now()})
        self.agent.manager.kick()
        return web.Response(status=200)

    # ---- tasks ------------------------------------------------------------------------

    async def tasks_list(self, request: web.Request) -> web.Response:
        flt = _filters(request)

        def get(s: ClusterState) -> list[dict]:
            wanted_services = None
            if "service" in flt:
                wanted_services = set()
                for key in flt["service"]:
                    try:
                        wanted_services.add(
                            _lookup(s.services, key, lambda x: x["spec"]["Name"], "service")["id"]
                        )
                    except CommandError:
                        pass
            out = []
            for t in sorted(s.tasks.values(), key=lambda t: (t["service_name"], t["slot"], t["created"])):
                if wanted_services is not None and t["service_id"] not in wanted_services:
                    continue
                if "node" in flt and t["node_id"] not in flt["node"]:
                    continue
                if "desired-state" in flt and t["desired_state"] not in flt["desired-state"]:
                    continue
                out.append(D.render_task(t, s.nodes.get(t["node_id"]), s.networks))
            return out

        return web.json_response(self._read(get))

    async def task_get(self, request: web.Request) -> web.Response:
        key = request.match_info["id"]

        def get(s: ClusterState) -> dict:
            t = _lookup(s.tasks, key, lambda t: f"{t['service_name']}.{t['slot']}", "task")
            return D.render_task(t, s.nodes.get(t["node_id"]), s.networks)

        return web.json_response(self._read(get))

    # ---- swarmnet extensions ----------------------------------------------------------

    async def local_tasks(self, request: web.Request) -> web.Response:
        """This node's tasks with sandbox and pid: what ``swarmnet exec`` needs."""
        worker = self.agent.worker
        return web.json_response([] if worker is None else worker.local_tasks())

    async def rotate_gossip_key(self, request: web.Request) -> web.Response:
        """Install, use, remove a new gossip key on every node (on the leader)."""
        await self._manager().rotate_gossip_key()
        return web.json_response({"ok": True})

    async def ipsec_status(self, request: web.Request) -> web.Response:
        """The encrypted overlays' key schedule, without key material."""
        return web.json_response(self._manager().ipsec_status())

    async def ipsec_rotate(self, request: web.Request) -> web.Response:
        """Rotate the key now (make-before-break; a no-op while a rotation runs)."""
        m = self._manager()
        await self._submit({"op": "ipsec_rotate"})
        m.kick()  # the leader's next pass starts it
        return web.json_response(m.ipsec_status())

    async def ipsec_config(self, request: web.Request) -> web.Response:
        """Rotation settings: ``interval_s``, ``threshold_packets``, ``grace_s``."""
        m = self._manager()
        body = await _json(request)
        fields = ("interval_s", "threshold_packets", "grace_s")
        if not isinstance(body, dict):
            raise CommandError(400, "body", "body: a JSON object is expected")
        for k in body:
            if k not in fields:
                raise CommandError(400, k, f"unknown field {k!r}; expected one of {fields}")
        if not body:
            raise CommandError(400, "body", f"give at least one of {fields}")
        await self._submit({"op": "ipsec_config", **body})
        m.kick()
        return web.json_response(m.ipsec_status())

    async def metrics_json(self, request: web.Request) -> web.Response:
        """This node's counters (gossip drops per reason, DNS outcomes, XFRM errors...)."""
        return web.json_response(await report.metrics(self.agent))

    async def metrics_prometheus(self, request: web.Request) -> web.Response:
        """The same counters in the Prometheus text format (what a scraper expects)."""
        lines: list[str] = []
        for section, values in sorted((await report.metrics(self.agent)).items()):
            for name, value in sorted(values.items()):
                if isinstance(value, bool) or not isinstance(value, int | float):
                    continue
                metric = prom_name(f"swarmnet_{section}_{name}")
                lines += [f"# TYPE {metric} untyped", f"{metric} {value}"]
        return web.Response(
            text="\n".join(lines) + "\n", content_type="text/plain", charset="utf-8"
        )

    async def gossip_status(self, request: web.Request) -> web.Response:
        """This node's gossip view: members, networks, drop counters."""
        return web.json_response(report.gossip_status(self.agent))


def prom_name(name: str) -> str:
    """A Prometheus metric name ([a-z_][a-z0-9_]*): the kernel's CamelCase XFRM counter
    names in snake case (``XfrmInNoStates`` -> ``xfrm_in_no_states``), anything else that
    is not a letter or digit an underscore."""
    out: list[str] = []
    for i, c in enumerate(name):
        if c.isupper() and i and (name[i - 1].islower() or name[i - 1].isdigit()):
            out.append("_")
        out.append(c.lower() if c.isascii() and c.isalnum() else "_")
    text = "".join(out)
    return text if not text[:1].isdigit() else "_" + text


def _now() -> str:
    from swarmnet.manager import now_iso

    return now_iso()


def make_app(agent: Agent) -> web.Application:
    api = API(agent)
    app = web.Application(middlewares=[errors_middleware], client_max_size=4 << 20)
    routes = [
        ("GET", "/_ping", api.ping),
        ("HEAD", "/_ping", api.ping),
        ("GET", "/version", api.version),
        ("GET", "/info", api.info),
        ("GET", "/swarm", api.swarm_get),
        ("POST", "/swarm/init", api.swarm_init),
        ("POST", "/swarm/join", api.swarm_join),
        ("POST", "/swarm/update", api.swarm_update),
        ("POST", "/swarm/leave", api.swarm_leave),
        ("GET", "/nodes", api.nodes_list),
        ("GET", "/nodes/{id}", api.node_get),
        ("POST", "/nodes/{id}/update", api.node_update),
        ("DELETE", "/nodes/{id}", api.node_delete),
        ("GET", "/networks", api.networks_list),
        ("POST", "/networks/create", api.network_create),
        ("GET", "/networks/{id}", api.network_get),
        ("DELETE", "/networks/{id}", api.network_delete),
        ("GET", "/services", api.services_list),
        ("POST", "/services/create", api.service_create),
        ("GET", "/services/{id}", api.service_get),
        ("POST", "/services/{id}/update", api.service_update),
        ("DELETE", "/services/{id}", api.service_delete),
        ("GET", "/tasks", api.tasks_list),
        ("GET", "/tasks/{id}", api.task_get),
        ("GET", "/swarmnet/local-tasks", api.local_tasks),
        ("POST", "/swarmnet/rotate-gossip-key", api.rotate_gossip_key),
        ("GET", "/swarmnet/gossip", api.gossip_status),
        ("GET", "/swarmnet/ipsec", api.ipsec_status),
        ("POST", "/swarmnet/ipsec/rotate", api.ipsec_rotate),
        ("POST", "/swarmnet/ipsec/config", api.ipsec_config),
        ("GET", "/swarmnet/metrics", api.metrics_json),
        ("GET", "/metrics", api.metrics_prometheus),
    ]
    for method, path, handler in routes:
        app.router.add_route(method, path, handler)
        app.router.add_route(method, r"/{api_version:v[0-9]+\.[0-9]+}" + path, handler)
    return app
