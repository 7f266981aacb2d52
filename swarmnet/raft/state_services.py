"""Service and task commands of the replicated state (``ClusterState`` inherits them): create,
update and remove services with their published ports and VIPs, and the task lifecycle.
Split from state.py by domain; the same rules hold (pure, deterministic, errors as results)."""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING

from swarmnet.raft.commands import (
    PUBLISHED_PORT_RANGE,
    CommandError,
    check_name,
    publishes_ingress,
    service_network_ids,
)
from swarmnet.raft.ipam import IPAMError

if TYPE_CHECKING:
    from swarmnet.raft.ipam import IPAM


class ServiceCommands:
    """Mixin of ClusterState: the attributes below are ClusterState's."""

    services: dict[str, dict]
    service_names: dict[str, str]
    tasks: dict[str, dict]
    networks: dict[str, dict]
    nodes: dict[str, dict]
    ipam: IPAM | None

    # ---- services -------------------------------------------------------------------

    def service_by_name(self, name: str) -> dict | None:
        sid = self.service_names.get(name)
        return None if sid is None else self.services.get(sid)

    def _check_service_networks(self, spec: dict) -> None:
        for i, nid in enumerate(service_network_ids(spec)):
            if nid not in self.networks:
                raise CommandError(
                    404, f"TaskTemplate.Networks[{i}].Target", f"network {nid} not found"
                )

    def _cmd_create_service(self, cmd: dict) -> dict:
        self._require_cluster()
        spec = cmd["spec"]
        name = check_name(spec.get("Name"))
        if cmd["id"] in self.services:
            return {"ok": True, "noop": True, "id": cmd["id"]}
        if self.service_by_name(name) is not None:
            raise CommandError(409, "Name", f"service {name} already exists")
        self._check_service_networks(spec)
        spec = copy.deepcopy(spec)
        ports = self._resolve_ports(cmd["id"], spec)
        svc = {
            "id": cmd["id"],
            "spec": spec,
            "endpoint": {"ports": ports, "vips": {}},
            "created": cmd["now"],
            "updated": cmd["now"],
            "version": 0,
        }
        self._sync_vips(svc)  # may raise (address space exhausted): nothing stored yet
        svc["version"] = self._bump()
        self.services[cmd["id"]] = svc
        self.service_names[svc["spec"]["Name"]] = cmd["id"]
        return {"ok": True, "id": cmd["id"]}

    # ---- service endpoints: published ports and VIPs --------------------------------

    def _resolve_ports(self, sid: str, spec: dict) -> list[dict]:
        """Check ``EndpointSpec.Ports`` against every other service and fill PublishedPort 0
        from 30000-32767 (lowest free: deterministic). Returns Docker's resolved ``Ports``."""
        ep = spec.get("EndpointSpec") or {}
        ports = [dict(p) for p in ep.get("Ports") or []]
        mode = ep.get("Mode") or "vip"
        taken: dict[tuple[str, int], str] = {}
        for other in self.services.values():
            if other["id"] == sid:
                continue
            for p in other.get("endpoint", {}).get("ports", []):
                taken[(p["Protocol"], p["PublishedPort"])] = other["spec"]["Name"]
        mine: set[tuple[str, int]] = set()
        for i, p in enumerate(ports):
            field = f"EndpointSpec.Ports[{i}]"
            if p.get("PublishMode", "ingress") == "ingress" and mode == "dnsrr":
                raise CommandError(
                    400,
                    f"{field}.PublishMode",
                    "a dnsrr service cannot publish in ingress mode (the routing mesh needs a "
                    "VIP): use mode=host or endpoint mode vip",
                )
            proto = p.get("Protocol", "tcp")
            if not p.get("PublishedPort"):
                lo, hi = PUBLISHED_PORT_RANGE
                free = next(
                    (
                        n
                        for n in range(lo, hi + 1)
                        if (proto, n) not in taken and (proto, n) not in mine
                    ),
                    None,
                )
                if free is None:
                    raise CommandError(409, f"{field}.PublishedPort", "no free published port left")
                p["PublishedPort"] = free
            key = (proto, p["PublishedPort"])
            if key in taken:
                raise CommandError(
                    409,
                    f"{field}.PublishedPort",
                    f"port {key[1]}/{proto} is already published by service {taken[key]}",
                )
            if key in mine:
                raise CommandError(
                    409, f"{field}.PublishedPort", f"port {key[1]}/{proto} is listed twice"
                )
            mine.add(key)
            p.setdefault("Protocol", "tcp")
            p.setdefault("PublishMode", "ingress")
        return ports

    def service_networks(self, svc: dict) -> list[str]:
        """The networks a service's tasks attach to, in order: its own, then ingress when it
        publishes a port (ingress mode: the routing mesh; host mode: the node's path to its
        local task, see services_hook)."""
        nets = service_network_ids(svc["spec"])
        ingress = self.ingress_network()
        if ingress is not None and svc.get("endpoint", {}).get("ports"):
            if ingress["id"] not in nets:
                nets = [*nets, ingress["id"]]
        return nets

    def _sync_vips(self, svc: dict) -> None:
        """One VIP per network in vip mode (ingress only with an ingress-mode publish); none
        in dnsrr mode. Releases what is no longer wanted (a vip -> dnsrr switch, moby#38575)."""
        assert self.ipam is not None
        ep = svc["spec"].get("EndpointSpec") or {}
        ingress = self.ingress_network()
        want: list[str] = []
        if (ep.get("Mode") or "vip") == "vip":
            for nid in self.service_networks(svc):
                if ingress is not None and nid == ingress["id"]:
                    if not publishes_ingress(svc["spec"]):
                        continue
                want.append(nid)
        owner = "vip:" + svc["id"]
        vips = svc["endpoint"]["vips"]
        for nid in list(vips):
            if nid not in want:
                self.ipam.release_ip(nid, owner)
                del vips[nid]
        got: list[str] = []
        try:
            for nid in want:
                if nid not in vips:
                    vips[nid] = self.ipam.allocate_ip(nid, owner)
                    got.append(nid)
        except IPAMError:
            for nid in got:
                self.ipam.release_ip(nid, owner)
                del vips[nid]
            raise

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
            raise CommandError(
                400, "TaskTemplate.Networks", "changing a service's networks is not supported yet"
            )
        self._check_service_networks(spec)
        spec = copy.deepcopy(spec)
        ports = self._resolve_ports(svc["id"], spec)
        old_spec, old_ep = svc["spec"], copy.deepcopy(svc.get("endpoint") or {"vips": {}})
        svc["spec"] = spec
        svc["endpoint"] = {"ports": ports, "vips": dict(old_ep.get("vips") or {})}
        try:
            self._sync_vips(svc)
        except IPAMError:
            svc["spec"], svc["endpoint"] = old_spec, old_ep
            raise
        svc["updated"] = cmd["now"]
        svc["version"] = self._bump()
        return {"ok": True}

    def _cmd_remove_service(self, cmd: dict) -> dict:
        svc = self.services.pop(cmd["id"], None)
        if svc is None:
            raise CommandError(404, "id", f"service {cmd['id']} not found")
        self.service_names.pop(svc["spec"]["Name"], None)
        assert self.ipam is not None
        for nid in (svc.get("endpoint") or {}).get("vips", {}):
            self.ipam.release_ip(nid, "vip:" + svc["id"])
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
            for nid in self.service_networks(svc):
                attachments.append(
                    {"network_id": nid, "address": self.ipam.allocate_ip(nid, cmd["id"])}
                )
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
