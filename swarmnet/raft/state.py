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

from swarmnet.raft.commands import (  # re-exported: the state's vocabulary
    INGRESS_NAME,
    NAME_RE,
    PUBLISHED_PORT_RANGE,
    TASK_TERMINAL,
    CommandError,
    check_name,
    ingress_id_for,
    publishes_ingress,
    service_network_ids,
    service_replicas,
)
from swarmnet.raft.ipam import IPAM, IPAMError
from swarmnet.raft.state_services import ServiceCommands

__all__ = [
    "INGRESS_NAME",
    "NAME_RE",
    "PUBLISHED_PORT_RANGE",
    "TASK_TERMINAL",
    "ClusterState",
    "CommandError",
    "check_name",
    "ingress_id_for",
    "ipsec_participants",
    "publishes_ingress",
    "service_network_ids",
    "service_replicas",
]


class ClusterState(ServiceCommands):
    """Plain data only (it is pickled into pysyncobj's full dump)."""

    def __init__(self) -> None:
        self.index = 0  # bumped by every command that changes something; Version.Index
        self.cluster: dict | None = None
        self.nodes: dict[str, dict] = {}
        self.networks: dict[str, dict] = {}
        self.services: dict[str, dict] = {}
        self.tasks: dict[str, dict] = {}
        self.ipam: IPAM | None = None
        # Name -> id indexes, kept in step by the commands that create and remove: a linear
        # scan per create_network was a fifth of a manager's CPU per write (docs/raft.md).
        self.network_names: dict[str, str] = {}
        self.service_names: dict[str, str] = {}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        if "network_names" not in state:  # a dump from before the indexes existed
            self.network_names = {n["name"]: i for i, n in self.networks.items()}
            self.service_names = {v["spec"]["Name"]: i for i, v in self.services.items()}

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
            # Gossip key ring (issue 5): base64 keys, made by the manager that ran init (the
            # state machine makes no randomness). Nodes get it at join and in assignments.
            "gossip": {"keys": [cmd["gossip_key"]], "primary": cmd["gossip_key"]}
            if cmd.get("gossip_key")
            else None,
        }
        # The ingress network, like swarmkit's newIngressNetwork: created on the fresh IPAM
        # so it takes the first block (10.0.0.0/24) and the first VNI (4096). Its id is
        # derived from the cluster id: deterministic, and the command stays as it was.
        # ``"ingress": False`` skips it (unit tests written before it existed).
        if cmd.get("ingress", True) is False:
            self._cmd_add_node(cmd["node"] | {"now": cmd["now"]})
            return {"ok": True}
        ingress_id = cmd.get("ingress_id") or ingress_id_for(cmd["cluster_id"])
        self._cmd_create_network(
            {
                "id": ingress_id,
                "name": INGRESS_NAME,
                "subnet": cmd.get("ingress_subnet"),
                "ingress": True,
                "now": cmd["now"],
            }
        )
        self.cluster["ingress_id"] = ingress_id
        self._cmd_add_node(cmd["node"] | {"now": cmd["now"]})
        return {"ok": True}

    def ingress_network(self) -> dict | None:
        iid = (self.cluster or {}).get("ingress_id")
        return None if iid is None else self.networks.get(iid)

    def _cmd_rotate_token(self, cmd: dict) -> dict:
        cluster = self._require_cluster()
        cluster["tokens"][cmd["role"]] = cmd["secret"]
        cluster["version"] = self._bump()
        cluster["updated"] = cmd["now"]
        return {"ok": True}

    def _cmd_gossip_keys(self, cmd: dict) -> dict:
        """One step of a gossip key rotation (install / use / remove): the whole ring."""
        cluster = self._require_cluster()
        keys, primary = cmd.get("keys"), cmd.get("primary")
        if (
            not isinstance(keys, list)
            or not 1 <= len(keys) <= 4
            or not all(isinstance(k, str) and 20 <= len(k) <= 64 for k in keys)
            or primary not in keys
        ):
            raise CommandError(400, "keys", "1 to 4 base64 keys, the primary among them")
        cluster["gossip"] = {"keys": list(keys), "primary": primary}
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
        ingress = self.ingress_network()
        if ingress is not None and self.ipam is not None:
            # The node's end of the routing mesh (Docker's ingress-sbox endpoint): replies of
            # the tasks a published port was forwarded to come back to this address.
            self.nodes[cmd["node_id"]]["ingress_addr"] = self.ipam.allocate_ip(
                ingress["id"], "node:" + cmd["node_id"]
            )
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
                409,
                "version",
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
                400,
                "id",
                f"node {node['hostname']} is a cluster manager and is a member of the raft "
                "cluster. It must be demoted to worker before removal",
            )
        if node["state"] != "down" and not cmd.get("force"):
            raise CommandError(
                400,
                "id",
                f"node {node['hostname']} is not down and can't be removed: "
                "use --force to remove it anyway",
            )
        for task in self.tasks.values():
            if task["node_id"] != node["id"]:
                continue
            # Every task of the node stops being wanted there, whatever its last status: a
            # node that left reported its tasks "shutdown" while they were still desired
            # running, and such a task held its slot forever (nothing rescheduled it).
            changed = task["desired_state"] == "running"
            if changed:
                task["desired_state"] = "shutdown"
            if task["status"]["state"] not in TASK_TERMINAL:
                task["status"] = {"state": "orphaned", "err": "node removed", "ts": cmd["now"]}
                changed = True
            if changed:
                task["version"] = self._bump()
        del self.nodes[node["id"]]
        ingress = self.ingress_network()
        if ingress is not None and self.ipam is not None:
            self.ipam.release_ip(ingress["id"], "node:" + node["id"])
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
        nid = self.network_names.get(name)
        return None if nid is None else self.networks.get(nid)

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
            raise CommandError(
                400, "Driver", f"driver {cmd.get('driver')!r} is not supported: use overlay"
            )
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
            # --opt encrypted (any value, like Docker): ESP between the nodes (swarmnet.ipsec)
            "encrypted": "encrypted" in (cmd.get("options") or {}),
            "labels": dict(cmd.get("labels") or {}),
            "created": cmd["now"],
            "version": idx,
        }
        self.network_names[name] = cmd["id"]
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
        if net.get("ingress"):
            users = sorted(
                s["spec"]["Name"] for s in self.services.values() if publishes_ingress(s["spec"])
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
        self.network_names.pop(net["name"], None)
        if self.cluster is not None and self.cluster.get("ingress_id") == net["id"]:
            self.cluster["ingress_id"] = None
        for n in list(self.nodes.values()):
            if net.get("ingress"):
                n.pop("ingress_addr", None)
        for svc in self.services.values():
            svc.get("endpoint", {}).get("vips", {}).pop(net["id"], None)
        self._bump()
        return {"ok": True}

    # ---- encrypted overlays (swarmnet.ipsec; the leader's driver is manager._ipsec_pass) ----

    def ipsec(self) -> dict:
        """The key schedule, in the cluster record: ``keyset`` (ipsec.keys.KeySet.to_dict(),
        AES keys included: the journal is already as secret as the CA key in it), the
        rotation ``phase`` and ``since`` (manager wall clock), ``force`` (rotate-key asked)."""
        c = self.cluster or {}
        return c.get("ipsec") or {"keyset": None, "phase": "steady", "since": 0.0, "force": False}

    def _cmd_ipsec_keys(self, cmd: dict) -> dict:
        """Publish a key set; compare-and-set on the version so that a deposed leader (or a
        retried command) never overwrites a newer set."""
        cluster = self._require_cluster()
        cur = self.ipsec()
        have = (cur.get("keyset") or {}).get("version", 0)
        if int(cmd["keyset"]["version"]) <= have:
            return {"ok": True, "noop": True}
        if int(cmd.get("expect_version", have)) != have:
            raise CommandError(409, "version", f"key set is at version {have}")
        cluster["ipsec"] = {
            "keyset": cmd["keyset"],
            "phase": cmd["phase"],
            "since": float(cmd["since"]),
            "force": bool(cur.get("force")) and not cmd.get("clear_force"),
        }
        self._bump()
        return {"ok": True}

    def _cmd_ipsec_rotate(self, cmd: dict) -> dict:
        """Operator request: rotate now (still make-before-break)."""
        cluster = self._require_cluster()
        cur = dict(self.ipsec())
        if cur.get("force") or cur.get("phase", "steady") != "steady":
            # Already asked, or a rotation is under way: that one is the rotation asked for.
            return {"ok": True, "noop": True}
        cur["force"] = True
        cluster["ipsec"] = cur
        self._bump()
        return {"ok": True}

    def _cmd_ipsec_config(self, cmd: dict) -> dict:
        """The operator's rotation settings (``swarm update --ipsec-rotation-*``): kept beside
        the key schedule, not in it, because every key-set publication replaces that record.
        Only the given fields change; the result is validated as a whole (ESN is always on,
        so the packet threshold may exceed 2^31)."""
        cluster = self._require_cluster()
        cur = dict(cluster.get("ipsec_config") or {})
        limits = {
            "interval_s": (1.0, 10 * 365 * 86400.0),
            "grace_s": (0.0, 86400.0),
            "threshold_packets": (1, 1 << 62),
        }
        for field, (lo, hi) in limits.items():
            if field not in cmd or cmd[field] is None:
                continue
            v = cmd[field]
            if isinstance(v, bool) or not isinstance(v, int | float):
                raise CommandError(400, field, f"{field} must be a number")
            if not lo <= v <= hi:
                raise CommandError(400, field, f"{field} must be between {lo:g} and {hi:g}")
            cur[field] = int(v) if field == "threshold_packets" else float(v)
        if cur == (cluster.get("ipsec_config") or {}):
            return {"ok": True, "noop": True}
        cluster["ipsec_config"] = cur
        self._bump()
        return {"ok": True}

    def _cmd_dispatcher_config(self, cmd: dict) -> dict:
        """``SwarmSpec.Dispatcher.HeartbeatPeriod`` (``swarm init|update
        --dispatcher-heartbeat``): the leader declares a node down after two periods
        without a poll. Slow hosts (VMs under emulation) need more than the 5 s default."""
        cluster = self._require_cluster()
        v = cmd.get("heartbeat_period_s")
        if isinstance(v, bool) or not isinstance(v, int | float) or not 1.0 <= v <= 3600.0:
            raise CommandError(
                400,
                "Dispatcher.HeartbeatPeriod",
                f"the heartbeat period must be between 1 s and 1 h, not {v!r}",
            )
        new = {"heartbeat_period_s": float(v)}
        if cluster.get("dispatcher") == new:
            return {"ok": True, "noop": True}
        cluster["dispatcher"] = new
        self._bump()
        return {"ok": True}

    def _cmd_ipsec_node(self, cmd: dict) -> dict:
        """A node's IPsec facts as it reported them over the node channel: ``esp`` (can its
        kernel do ESP), ``epoch`` (its sender epoch, ipsec.keys) and ``applied`` (the newest
        key-set version it programmed completely)."""
        node = self.nodes.get(cmd["node_id"])
        if node is None:
            return {"ok": True, "noop": True}
        new = {k: cmd[k] for k in ("esp", "epoch", "applied") if k in cmd}
        cur = node.get("ipsec") or {}
        if {**cur, **new} == cur:
            return {"ok": True, "noop": True}
        node["ipsec"] = {**cur, **new}
        node["version"] = self._bump()
        return {"ok": True}


def ipsec_participants(state: ClusterState) -> dict[str, set[str]]:
    """node id -> the encrypted networks it takes part in: ready nodes whose kernel did not
    report "no ESP", with a task that should run on an encrypted network. These nodes get
    the key set in their assignment, and key rotation waits for their acknowledgements."""
    out: dict[str, set[str]] = {}
    for t in state.tasks.values():
        if t["desired_state"] != "running":
            continue
        node = state.nodes.get(t["node_id"])
        if (
            node is None
            or node["state"] != "ready"
            or (node.get("ipsec") or {}).get("esp") is False
        ):
            continue
        for a in t["networks"]:
            if (state.networks.get(a["network_id"]) or {}).get("encrypted"):
                out.setdefault(node["id"], set()).add(a["network_id"])
    return out
