"""The replicated cluster state and its commands: a pure, deterministic state machine.

Every manager applies the same commands in the same (Raft log) order and so reaches the same
state. Hence the rules (from pysyncobj/RESULTS.md and DESIGN "Raft store"):
- commands are plain dicts (msgpack on the wire), carrying every ID and timestamp they
  need: nothing here reads a clock or a random source;
- every decision that must be unique cluster-wide (IPs, subnets, VNIs, names, slots) is made
  HERE, from replicated state, never "read locally then write" (that is how Swarm hands out
  duplicate IPs after a leader change, moby#33795);
- commands are idempotent or compare-and-set, because a timed-out command may still apply;
- errors are results (``{"error": {...}}``), never exceptions escaping into pysyncobj.
"""

from __future__ import annotations

import copy
import re
from typing import Any

from swarmnet.raft.ipam import IPAM, IPAMError

NAME_RE = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9_.-]{0,62}$")
TASK_TERMINAL = {"complete", "failed", "shutdown", "rejected", "orphaned", "remove"}


class CommandError(Exception):
    """A command refused; becomes an HTTP error naming the field at fault."""

    def __init__(self, status: int, field: str, message: str):
        super().__init__(message)
        self.status = status
        self.field = field
        self.message = message

    def as_result(self) -> dict:
        return {"error": {"status": self.status, "field": self.field, "message": self.message}}


def check_name(name: Any, field: str = "Name") -> str:
    if not isinstance(name, str) or not name:
        raise CommandError(400, field, f"{field} is required")
    # fullmatch: with match(), "$" also matches before a trailing newline ("web\n").
    if not NAME_RE.fullmatch(name):
        raise CommandError(
            400,
            field,
            f"invalid {field} {name!r}: use 1-63 characters [a-zA-Z0-9_.-], starting with a letter or digit",
        )
    return name


class ClusterState:
    """Plain data only (it is pickled into pysyncobj's full dump)."""

    def __init__(self) -> None:
        self.index = 0  # bumped by every command that changes something; Version.Index
        self.cluster: dict | None = None
        self.nodes: dict[str, dict] = {}
        self.networks: dict[str, dict] = {}
        self.services: dict[str, dict] = {}
        self.tasks: dict[str, dict] = {}
        self.ipam: IPAM | None = None

    # ---- dispatch -------------------------------------------------------------------

    def apply(self, cmd: dict) -> dict:
        handler = getattr(self, "_cmd_" + str(cmd.get("op")), None)
        if handler is None:
            return CommandError(400, "op", f"unknown command {cmd.get('op')!r}").as_result()
        try:
            result = handler(cmd)
        except CommandError as e:
            return e.as_result()
        except IPAMError as e:
            return CommandError(e.status, e.field, e.message).as_result()
        return result if result is not None else {"ok": True}

    def _bump(self) -> int:
        self.index += 1
        return self.index

    def _require_cluster(self) -> dict:
        if self.cluster is None:
            raise CommandError(503, "swarm", "this node is not part of a swarm")
        return self.cluster

    # ---- cluster and nodes ----------------------------------------------------------

    def _cmd_init(self, cmd: dict) -> dict:
        if self.cluster is not None:
            if self.cluster["id"] == cmd["cluster_id"]:
                return {"ok": True, "noop": True}
            raise CommandError(503, "swarm", "this node is already part of a swarm")
        self.ipam = IPAM(cmd.get("pools") or None, cmd.get("subnet_size") or 24)
        idx = self._bump()
        self.cluster = {
            "id": cmd["cluster_id"],
            "created": cmd["now"],
            "updated": cmd["now"],
            "version": idx,
            "tokens": dict(cmd["tokens"]),  # role -> secret part of the join token
            "digest": cmd["digest"],  # base36 SHA-256 of the CA certificate (swarmnet.pki)
            # The cluster CA, so that any manager can sign (docs/security.md). The key makes
            # the Raft journal and dump as sensitive as the key itself: 0600 files.
            "ca_cert": cmd.get("ca_cert"),
            "ca_key": cmd.get("ca_key"),
            # swarmnet.pki.RevocationList.to_json(): node ids removed by ``node rm``.
            "revoked": {"node_ids": [], "serials": []},
            "pools": list(cmd.get("pools") or ["10.0.0.0/8"]),
            "subnet_size": cmd.get("subnet_size") or 24,
        }
        self._cmd_add_node(cmd["node"] | {"now": cmd["now"]})
        return {"ok": True}

    def _cmd_rotate_token(self, cmd: dict) -> dict:
        cluster = self._require_cluster()
        cluster["tokens"][cmd["role"]] = cmd["secret"]
        cluster["version"] = self._bump()
        cluster["updated"] = cmd["now"]
        return {"ok": True}

    def _cmd_add_node(self, cmd: dict) -> dict:
        self._require_cluster()
        node = self.nodes.get(cmd["node_id"])
        if node is not None:
            return {"ok": True, "noop": True}
        idx = self._bump()
        self.nodes[cmd["node_id"]] = {
            "id": cmd["node_id"],
            "hostname": cmd["hostname"],
            "addr": cmd["addr"],
            "role": cmd["role"],
            "availability": "active",
            "state": "ready",
            "created": cmd["now"],
            "updated": cmd["now"],
            "version": idx,
        }
        return {"ok": True}

    def _cmd_node_state(self, cmd: dict) -> dict:
        node = self.nodes.get(cmd["node_id"])
        if node is None:
            raise CommandError(404, "id", f"node {cmd['node_id']} not found")
        if node["state"] == cmd["state"]:
            return {"ok": True, "noop": True}
        node["state"] = cmd["state"]
        node["updated"] = cmd["now"]
        node["version"] = self._bump()
        if cmd["state"] == "down":
            # Tasks of a dead node can never report again: orphan them so the scheduler
            # replaces them elsewhere and their addresses are released.
            # Also a task whose process just exited (terminal status, desired running): it
            # would hold its slot forever. A "remove" stays "remove".
            for task in self.tasks.values():
                if task["node_id"] != node["id"]:
                    continue
                live = task["status"]["state"] not in TASK_TERMINAL
                if not live and task["desired_state"] != "running":
                    continue
                if task["desired_state"] == "running":
                    task["desired_state"] = "shutdown"
                if live:
                    task["status"] = {"state": "orphaned", "err": "node down", "ts": cmd["now"]}
                task["version"] = self._bump()
        return {"ok": True}

    def _cmd_noop(self, cmd: dict) -> dict:
        # A new leader commits one of these before acting (manager._leader_loop): its commit
        # proves the leadership; it changes nothing, not even the index.
        return {"ok": True, "noop": True}

    def _cmd_node_update(self, cmd: dict) -> dict:
        """Spec.Role / Spec.Availability, compare-and-set on the node's version."""
        node = self.nodes.get(cmd["node_id"])
        if node is None:
            raise CommandError(404, "id", f"node {cmd['node_id']} not found")
        if cmd.get("version") is not None and int(cmd["version"]) != node["version"]:
            raise CommandError(
                409, "version",
                f"update out of sequence: node version is {node['version']}, not {cmd['version']}",
            )
        role = cmd.get("role", node["role"])
        avail = cmd.get("availability", node["availability"])
        if role not in ("manager", "worker"):
            raise CommandError(400, "Role", f"invalid role {role!r}: use manager or worker")
        if avail not in ("active", "pause", "drain"):
            raise CommandError(400, "Availability", f"invalid availability {avail!r}")
        if role == "worker" and node["role"] == "manager":
            managers = [n for n in self.nodes.values() if n["role"] == "manager"]
            if len(managers) <= 1:
                raise CommandError(
                    400, "Role", "attempting to demote the last manager of the swarm"
                )
        if role == node["role"] and avail == node["availability"]:
            return {"ok": True, "noop": True}
        node["role"], node["availability"] = role, avail
        node["updated"] = cmd["now"]
        node["version"] = self._bump()
        return {"ok": True}

    def _cmd_remove_node(self, cmd: dict) -> dict:
        node = self.nodes.get(cmd["node_id"])
        if node is None:
            raise CommandError(404, "id", f"node {cmd['node_id']} not found")
        if node["role"] == "manager":
            raise CommandError(
                400, "id",
                f"node {node['hostname']} is a cluster manager and is a member of the raft "
                "cluster. It must be demoted to worker before removal",
            )
        if node["state"] != "down" and not cmd.get("force"):
            raise CommandError(
                400, "id",
                f"node {node['hostname']} is not down and can't be removed: "
                "use --force to remove it anyway",
            )
        for task in self.tasks.values():
            if task["node_id"] == node["id"] and task["status"]["state"] not in TASK_TERMINAL:
                if task["desired_state"] == "running":
                    task["desired_state"] = "shutdown"
                task["status"] = {"state": "orphaned", "err": "node removed", "ts": cmd["now"]}
                task["version"] = self._bump()
        del self.nodes[node["id"]]
        # Revoke: its certificate names this id; the node channel refuses it from now on,
        # on new and already open connections alike. Node ids are never reused.
        cluster = self.cluster
        if cluster is not None:
            revoked = cluster.setdefault("revoked", {"node_ids": [], "serials": []})
            if node["id"] not in revoked["node_ids"]:
                revoked["node_ids"] = sorted([*revoked["node_ids"], node["id"]])
        self._bump()
        return {"ok": True}

    # ---- networks -------------------------------------------------------------------

    def network_by_name(self, name: str) -> dict | None:
        for n in self.networks.values():
            if n["name"] == name:
                return n
        return None

    def _cmd_create_network(self, cmd: dict) -> dict:
        self._require_cluster()
        assert self.ipam is not None
        name = check_name(cmd.get("name"))
        # The id first: a retried create (unknown outcome) finds its own network by name too,
        # and must be a no-op, not a 409.
        if cmd["id"] in self.networks:
            return {"ok": True, "noop": True, "id": cmd["id"]}
        if self.network_by_name(name) is not None:
            raise CommandError(409, "Name", f"network with name {name} already exists")
        if cmd.get("driver", "overlay") != "overlay":
            raise CommandError(400, "Driver", f"driver {cmd.get('driver')!r} is not supported: use overlay")
        subnet = self.ipam.allocate_subnet(cmd["id"], cmd.get("subnet"))
        try:
            vni = self.ipam.allocate_vni(cmd["id"], cmd.get("vni"))
        except IPAMError:
            self.ipam.release_subnet(cmd["id"])  # nothing half-created
            raise
        idx = self._bump()
        self.networks[cmd["id"]] = {
            "id": cmd["id"],
            "name": name,
            "driver": "overlay",
            "subnet": subnet,
            "gateway": self.ipam.gateway_of(cmd["id"]),
            "vni": vni,
            "attachable": bool(cmd.get("attachable")),
            "ingress": bool(cmd.get("ingress")),
            "options": dict(cmd.get("options") or {}),
            "labels": dict(cmd.get("labels") or {}),
            "created": cmd["now"],
            "version": idx,
        }
        return {"ok": True, "id": cmd["id"]}

    def _cmd_remove_network(self, cmd: dict) -> dict:
        net = self.networks.get(cmd["id"])
        if net is None:
            raise CommandError(404, "id", f"network {cmd['id']} not found")
        users = sorted(
            s["spec"]["Name"]
            for s in self.services.values()
            if net["id"] in service_network_ids(s["spec"])
        )
        if users:
            raise CommandError(
                409, "id", f"network {net['name']} is in use by service(s) {', '.join(users)}"
            )
        # Tasks still shutting down (their service is gone or scaled down) do not hold the
        # network (docker users hit "network in use" right after `service rm`): they are
        # detached below, their addresses go with the subnet, and their nodes tear down the
        # kernel objects when the network leaves their assignment.
        busy = [
            t["id"]
            for t in self.tasks.values()
            if t["desired_state"] == "running"
            and any(a["network_id"] == net["id"] for a in t["networks"])
        ]
        if busy:
            raise CommandError(
                409, "id", f"network {net['name']} is in use by {len(busy)} running task(s)"
            )
        assert self.ipam is not None
        for t in self.tasks.values():
            kept = [a for a in t["networks"] if a["network_id"] != net["id"]]
            if len(kept) != len(t["networks"]):
                t["networks"] = kept
                t["version"] = self._bump()
        self.ipam.release_subnet(net["id"])
        self.ipam.release_vni(net["id"])
        del self.networks[net["id"]]
        self._bump()
        return {"ok": True}

    # ---- services -------------------------------------------------------------------

    def service_by_name(self, name: str) -> dict | None:
        for s in self.services.values():
            if s["spec"]["Name"] == name:
                return s
        return None

    def _check_service_networks(self, spec: dict) -> None:
        for i, nid in enumerate(service_network_ids(spec)):
            if nid not in self.networks:
                raise CommandError(404, f"TaskTemplate.Networks[{i}].Target", f"network {nid} not found")

    def _cmd_create_service(self, cmd: dict) -> dict:
        self._require_cluster()
        spec = cmd["spec"]
        name = check_name(spec.get("Name"))
        if cmd["id"] in self.services:
            return {"ok": True, "noop": True, "id": cmd["id"]}
        if self.service_by_name(name) is not None:
            raise CommandError(409, "Name", f"service {name} already exists")
        self._check_service_networks(spec)
        idx = self._bump()
        self.services[cmd["id"]] = {
            "id": cmd["id"],
            "spec": copy.deepcopy(spec),
            "created": cmd["now"],
            "updated": cmd["now"],
            "version": idx,
        }
        return {"ok": True, "id": cmd["id"]}

    def _cmd_update_service(self, cmd: dict) -> dict:
        svc = self.services.get(cmd["id"])
        if svc is None:
            raise CommandError(404, "id", f"service {cmd['id']} not found")
        if cmd.get("version") is not None and int(cmd["version"]) != svc["version"]:
            raise CommandError(
                409,
                "version",
                f"update out of sequence: service version is {svc['version']}, not {cmd['version']}",
            )
        spec = cmd["spec"]
        if spec.get("Name") != svc["spec"]["Name"]:
            raise CommandError(400, "Name", "renaming a service is not supported")
        if service_network_ids(spec) != service_network_ids(svc["spec"]):
            raise CommandError(400, "TaskTemplate.Networks", "changing a service's networks is not supported yet")
        self._check_service_networks(spec)
        svc["spec"] = copy.deepcopy(spec)
        svc["updated"] = cmd["now"]
        svc["version"] = self._bump()
        return {"ok": True}

    def _cmd_remove_service(self, cmd: dict) -> dict:
        svc = self.services.pop(cmd["id"], None)
        if svc is None:
            raise CommandError(404, "id", f"service {cmd['id']} not found")
        for task in self.tasks.values():
            if task["service_id"] == svc["id"] and task["desired_state"] != "remove":
                task["desired_state"] = "remove"
                task["version"] = self._bump()
        self._bump()
        return {"ok": True}

    # ---- tasks ----------------------------------------------------------------------

    def _cmd_create_task(self, cmd: dict) -> dict:
        svc = self.services.get(cmd["service_id"])
        if svc is None:
            return {"ok": True, "noop": True}  # removed meanwhile
        if cmd["id"] in self.tasks:
            return {"ok": True, "noop": True}
        for t in self.tasks.values():
            # Compare-and-set on the slot: two schedulers (or a retried command) must never
            # fill one slot twice.
            if (
                t["service_id"] == svc["id"]
                and t["slot"] == cmd["slot"]
                and t["desired_state"] == "running"
            ):
                return {"ok": True, "noop": True}
        node = self.nodes.get(cmd["node_id"])
        if node is None or node["state"] != "ready":
            return {"ok": True, "noop": True}
        assert self.ipam is not None
        attachments = []
        try:
            for nid in service_network_ids(svc["spec"]):
                attachments.append({"network_id": nid, "address": self.ipam.allocate_ip(nid, cmd["id"])})
        except IPAMError:
            for a in attachments:
                self.ipam.release_ip(a["network_id"], cmd["id"])
            raise
        idx = self._bump()
        self.tasks[cmd["id"]] = {
            "id": cmd["id"],
            "service_id": svc["id"],
            "service_name": svc["spec"]["Name"],
            "slot": cmd["slot"],
            "node_id": node["id"],
            "desired_state": "running",
            "status": {"state": "assigned", "err": "", "ts": cmd["now"]},
            "networks": attachments,
            "created": cmd["now"],
            "version": idx,
        }
        return {"ok": True, "id": cmd["id"]}

    def _cmd_task_desired(self, cmd: dict) -> dict:
        task = self.tasks.get(cmd["id"])
        if task is None or task["desired_state"] == cmd["desired"]:
            return {"ok": True, "noop": True}
        if task["desired_state"] == "remove":
            return {"ok": True, "noop": True}  # never resurrect a removed task
        task["desired_state"] = cmd["desired"]
        task["version"] = self._bump()
        return {"ok": True}

    def _cmd_task_status(self, cmd: dict) -> dict:
        changed = 0
        for st in cmd["statuses"]:
            task = self.tasks.get(st["id"])
            if task is None or task["node_id"] != cmd["node_id"]:
                continue  # a node may only report its own tasks
            new = {"state": st["state"], "err": st.get("err", ""), "ts": cmd["now"]}
            if task["status"]["state"] == new["state"] and task["status"]["err"] == new["err"]:
                continue
            task["status"] = new
            if "pid" in st:
                task["pid"] = st["pid"]
            task["version"] = self._bump()
            changed += 1
        return {"ok": True, "changed": changed}

    def _cmd_remove_task(self, cmd: dict) -> dict:
        task = self.tasks.pop(cmd["id"], None)
        if task is None:
            return {"ok": True, "noop": True}
        assert self.ipam is not None
        for a in task["networks"]:
            self.ipam.release_ip(a["network_id"], task["id"])
        self._bump()
        return {"ok": True}


def service_network_ids(spec: dict) -> list[str]:
    nets = (spec.get("TaskTemplate") or {}).get("Networks") or spec.get("Networks") or []
    return [n["Target"] for n in nets]


def service_replicas(spec: dict) -> int:
    return int(((spec.get("Mode") or {}).get("Replicated") or {}).get("Replicas", 1))
