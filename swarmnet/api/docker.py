"""Docker Engine API shapes: validation of request bodies and rendering of state.

Pure functions (no aiohttp), so that the same validation serves the API, the CLI's tests and
the fuzz tests. Field names follow the Engine API that docker 28 speaks (SWARM-INTERNALS §2);
errors name the field at fault.
"""

from __future__ import annotations

import ipaddress
import secrets
import string
from typing import Any

from swarmnet.raft.state import CommandError, check_name, service_network_ids, service_replicas

ENGINE_VERSION = "28.5.2-swarmnet"
API_VERSION = "1.51"
API_MIN_VERSION = "1.24"
_B36 = string.digits + string.ascii_lowercase


def new_id() -> str:
    """25 characters of base36, like swarmkit's identity.NewID()."""
    return "".join(secrets.choice(_B36) for _ in range(25))


def bad(field: str, message: str, status: int = 400) -> CommandError:
    return CommandError(status, field, message)


def _obj(body: Any, field: str) -> dict:
    if body is None:
        return {}
    if not isinstance(body, dict):
        raise bad(field, f"{field} must be a JSON object")
    return body


def _is_text(value: Any) -> bool:
    """A string that can travel in a Raft command and an exec: JSON allows lone surrogates
    ("\\ud800"), which msgpack cannot encode, and NUL, which no argv or environment can hold."""
    if not isinstance(value, str) or "\x00" in value:
        return False
    try:
        value.encode()
    except UnicodeEncodeError:
        return False
    return True


def _str_list(value: Any, field: str) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(_is_text(v) for v in value):
        raise bad(field, f"{field} must be a list of strings")
    return list(value)


def _str_map(value: Any, field: str) -> dict[str, str]:
    value = _obj(value, field)
    for k, v in value.items():
        if not _is_text(k) or not _is_text(v):
            raise bad(field, f"{field} must map strings to strings")
    return dict(value)


# ---- networks -----------------------------------------------------------------------


def parse_network_create(body: Any) -> dict:
    body = _obj(body, "body")
    name = check_name(body.get("Name"))
    driver = body.get("Driver") or "overlay"
    if driver != "overlay":
        raise bad("Driver", f"driver {driver!r} is not supported: swarmnet networks are overlay")
    subnet = None
    ipam = _obj(body.get("IPAM"), "IPAM")
    configs = ipam.get("Config") or []
    if not isinstance(configs, list):
        raise bad("IPAM.Config", "IPAM.Config must be a list")
    if len(configs) > 1:
        raise bad("IPAM.Config", "only one IPv4 subnet per network is supported")
    if configs:
        cfg = _obj(configs[0], "IPAM.Config[0]")
        subnet = cfg.get("Subnet")
        if subnet is not None and not isinstance(subnet, str):
            raise bad("IPAM.Config[0].Subnet", "Subnet must be a string like 10.1.2.0/24")
        if subnet:
            try:
                net = ipaddress.ip_network(subnet, strict=False)
            except ValueError:
                raise bad("IPAM.Config[0].Subnet", f"invalid subnet {subnet!r}") from None
            if net.version != 4:
                raise bad("IPAM.Config[0].Subnet", "only IPv4 subnets are supported")
    options = _str_map(body.get("Options"), "Options")
    # "encrypted" (any value, as in Docker) is accepted: ESP between the nodes, see
    # docs/encryption.md. A node whose kernel lacks ESP fails the tasks, never cleartext.
    if body.get("EnableIPv6"):
        raise bad("EnableIPv6", "IPv6 overlays are not supported")
    return {
        "name": name,
        "driver": "overlay",
        "subnet": subnet or None,
        "attachable": bool(body.get("Attachable")),
        "options": options,
        "labels": _str_map(body.get("Labels"), "Labels"),
    }


def render_network(n: dict) -> dict:
    return {
        "Name": n["name"],
        "Id": n["id"],
        "Created": n["created"],
        "Scope": "swarm",
        "Driver": "overlay",
        "EnableIPv4": True,
        "EnableIPv6": False,
        "IPAM": {
            "Driver": "default",
            "Options": None,
            "Config": [{"Subnet": n["subnet"], "Gateway": n["gateway"]}],
        },
        "Internal": False,
        "Attachable": n["attachable"],
        "Ingress": n["ingress"],
        "ConfigFrom": {"Network": ""},
        "ConfigOnly": False,
        "Containers": {},
        "Options": {
            "com.docker.network.driver.overlay.vxlanid_list": str(n["vni"]),
            **n["options"],
        },
        "Labels": n["labels"],
    }


# ---- services -----------------------------------------------------------------------


def parse_service_spec(body: Any, resolve_network) -> dict:
    """Validate a ServiceSpec; ``resolve_network(name_or_id) -> id | None``."""
    body = _obj(body, "body")
    name = check_name(body.get("Name"))
    tt = _obj(body.get("TaskTemplate"), "TaskTemplate")
    cs = _obj(tt.get("ContainerSpec"), "TaskTemplate.ContainerSpec")
    image = cs.get("Image")
    args = _str_list(cs.get("Args"), "TaskTemplate.ContainerSpec.Args")
    command = _str_list(cs.get("Command"), "TaskTemplate.ContainerSpec.Command")
    if not _is_text(image) or not image.strip():
        raise bad(
            "TaskTemplate.ContainerSpec.Image",
            "a command to run is required (Image is the program, Args the rest of the command line)",
        )
    image = program_from_image(image)
    env = _str_list(cs.get("Env"), "TaskTemplate.ContainerSpec.Env")
    if not all("=" in e for e in env):
        raise bad("TaskTemplate.ContainerSpec.Env", "Env must be a list of NAME=value strings")
    mode = _obj(body.get("Mode"), "Mode")
    if "Global" in mode:
        raise bad("Mode.Global", "global services are not supported yet")
    rep = _obj(mode.get("Replicated"), "Mode.Replicated")
    replicas = rep.get("Replicas", 1)
    if isinstance(replicas, bool) or not isinstance(replicas, int) or replicas < 0:
        raise bad("Mode.Replicated.Replicas", f"replicas must be a whole number >= 0, not {replicas!r}")
    if replicas > 10000:
        raise bad("Mode.Replicated.Replicas", "replicas must be at most 10000")
    networks = tt.get("Networks") if "Networks" in tt else body.get("Networks")
    networks = networks or []
    if not isinstance(networks, list):
        raise bad("TaskTemplate.Networks", "Networks must be a list")
    targets: list[dict] = []
    for i, n in enumerate(networks):
        n = _obj(n, f"TaskTemplate.Networks[{i}]")
        target = n.get("Target")
        if not isinstance(target, str) or not target:
            raise bad(f"TaskTemplate.Networks[{i}].Target", "Target is required")
        nid = resolve_network(target)
        if nid is None:
            raise bad(f"TaskTemplate.Networks[{i}].Target", f"network {target} not found", 404)
        if any(t["Target"] == nid for t in targets):
            raise bad(f"TaskTemplate.Networks[{i}].Target", f"network {target} is listed twice")
        aliases = _str_list(n.get("Aliases"), f"TaskTemplate.Networks[{i}].Aliases")
        targets.append({"Target": nid, "Aliases": aliases})
    ep = _obj(body.get("EndpointSpec"), "EndpointSpec")
    ep_mode = ep.get("Mode") or "vip"
    if ep_mode not in ("vip", "dnsrr"):
        raise bad("EndpointSpec.Mode", f"endpoint mode must be vip or dnsrr, not {ep_mode!r}")
    ports = parse_ports(ep.get("Ports"), ep_mode)
    force = tt.get("ForceUpdate") or 0
    # An unsigned 64-bit counter in Docker; bounded so that msgpack can carry it.
    if isinstance(force, bool) or not isinstance(force, int) or not 0 <= force < 2**63:
        raise bad(
            "TaskTemplate.ForceUpdate", f"ForceUpdate must be a whole number >= 0, not {force!r}"
        )
    return {
        "Name": name,
        "Labels": _str_map(body.get("Labels"), "Labels"),
        "TaskTemplate": {
            "ContainerSpec": {"Image": image, "Args": args, "Command": command, "Env": env},
            "Networks": targets,
            "RestartPolicy": {"Condition": "any", "Delay": 500_000_000, "MaxAttempts": 0},
            "ForceUpdate": force,
        },
        "Mode": {"Replicated": {"Replicas": replicas}},
        "EndpointSpec": {"Mode": ep_mode, "Ports": ports} if ports else {"Mode": ep_mode},
    }


PUBLISH_MODES = ("ingress", "host")
PORT_PROTOCOLS = ("tcp", "udp")
# The agent's own ports: a published port answers on every node (ingress) or on the task's
# node (host), in front of the agent, so these would cut nodes off the swarm.
RESERVED_PORTS = {
    ("tcp", 2377): "the manager's node channel",
    ("tcp", 7946): "gossip",
    ("udp", 7946): "gossip",
    ("udp", 4789): "VXLAN",
}


def _unset(value: Any) -> bool:
    """Absent, null or "" means the default (the docker CLI sends "" for an unset mode);
    any other falsy value ([], false, 0.0) is a mistake to report, not a default."""
    return value is None or value == "" and isinstance(value, str)


def _port_number(value: Any, field: str, allow_zero: bool) -> int:
    lo = 0 if allow_zero else 1
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= 65535:
        raise bad(field, f"{field.rsplit('.', 1)[-1]} must be a port number in {lo}-65535, not {value!r}")
    return value


def parse_ports(value: Any, ep_mode: str) -> list[dict]:
    """``EndpointSpec.Ports``: [{Protocol tcp|udp, TargetPort, PublishedPort, PublishMode
    ingress|host}]. PublishedPort 0 (or absent) means "pick one from 30000-32767"; the
    choice, and conflicts with other services, are decided in the replicated state."""
    if value is None:
        return []
    if not isinstance(value, list):
        raise bad("EndpointSpec.Ports", "Ports must be a list")
    out: list[dict] = []
    for i, p in enumerate(value):
        f = f"EndpointSpec.Ports[{i}]"
        p = _obj(p, f)
        proto = "tcp" if _unset(p.get("Protocol")) else p["Protocol"]
        if not isinstance(proto, str) or proto not in PORT_PROTOCOLS:
            raise bad(f"{f}.Protocol", f"protocol must be tcp or udp, not {proto!r}")
        mode = "ingress" if _unset(p.get("PublishMode")) else p["PublishMode"]
        if not isinstance(mode, str) or mode not in PUBLISH_MODES:
            raise bad(f"{f}.PublishMode", f"publish mode must be ingress or host, not {mode!r}")
        if "TargetPort" not in p:
            raise bad(f"{f}.TargetPort", "TargetPort is required")
        target = _port_number(p.get("TargetPort"), f"{f}.TargetPort", allow_zero=False)
        published = p.get("PublishedPort")
        published = _port_number(
            0 if published is None else published, f"{f}.PublishedPort", allow_zero=True
        )
        if (proto, published) in RESERVED_PORTS:
            raise bad(
                f"{f}.PublishedPort",
                f"port {published}/{proto} is reserved for {RESERVED_PORTS[proto, published]}",
            )
        if mode == "host" and published == 0:
            raise bad(f"{f}.PublishedPort", "a host-mode publish needs an explicit PublishedPort")
        if mode == "ingress" and ep_mode == "dnsrr":
            raise bad(
                f"{f}.PublishMode",
                "port published with ingress mode can't be used with dnsrr mode",
            )
        for j, q in enumerate(out):
            if published and (q["Protocol"], q["PublishedPort"]) == (proto, published):
                raise bad(f"{f}.PublishedPort", f"port {published}/{proto} is listed twice (also Ports[{j}])", 409)
        out.append(
            {"Protocol": proto, "TargetPort": target, "PublishedPort": published, "PublishMode": mode}
        )
    return out


def program_from_image(image: str) -> str:
    """The program named by a Docker image reference. The docker CLI normalises what the
    user typed (``python3`` becomes ``python3:latest``, or ``docker.io/library/python3``
    with a digest when it could resolve one); swarmnet's Image is a program, so undo that."""
    image = image.strip()
    image = image.split("@", 1)[0]
    for prefix in ("docker.io/library/", "index.docker.io/library/"):
        if image.startswith(prefix):
            image = image[len(prefix) :]
    if image.endswith(":latest"):
        image = image[: -len(":latest")]
    return image


def service_argv(spec: dict) -> list[str]:
    cs = spec["TaskTemplate"]["ContainerSpec"]
    return list(cs.get("Command") or []) + [cs["Image"]] + list(cs.get("Args") or [])


def render_service(s: dict, tasks: list[dict]) -> dict:
    running = sum(1 for t in tasks if t["status"]["state"] == "running" and t["desired_state"] == "running")
    return {
        "ID": s["id"],
        "Version": {"Index": s["version"]},
        "CreatedAt": s["created"],
        "UpdatedAt": s["updated"],
        "Spec": s["spec"],
        "Endpoint": render_endpoint(s),
        "ServiceStatus": {
            "RunningTasks": running,
            "DesiredTasks": service_replicas(s["spec"]),
            "CompletedTasks": 0,
        },
    }


def render_endpoint(s: dict) -> dict:
    """Docker's ``Service.Endpoint``: the spec, the resolved ports (PublishedPort filled)
    and ``VirtualIPs`` [{NetworkID, Addr}] (vip mode only)."""
    ep = s.get("endpoint") or {}
    out: dict = {"Spec": s["spec"].get("EndpointSpec", {"Mode": "vip"})}
    if ep.get("ports"):
        out["Ports"] = [dict(p) for p in ep["ports"]]
    vips = ep.get("vips") or {}
    if vips:
        out["VirtualIPs"] = [{"NetworkID": nid, "Addr": addr} for nid, addr in sorted(vips.items())]
    return out


_STATE_MAP = {"assigned": "assigned", "starting": "starting", "running": "running"}


def render_task(t: dict, node: dict | None, networks: dict[str, dict]) -> dict:
    return {
        "ID": t["id"],
        "Version": {"Index": t["version"]},
        "CreatedAt": t["created"],
        "UpdatedAt": t["status"]["ts"],
        "Name": f"{t['service_name']}.{t['slot']}",
        "ServiceID": t["service_id"],
        "Slot": t["slot"],
        "NodeID": t["node_id"],
        "Status": {
            "Timestamp": t["status"]["ts"],
            "State": t["status"]["state"],
            "Message": t["status"]["state"],
            "Err": t["status"]["err"],
            "ContainerStatus": {"PID": t.get("pid", 0)},
        },
        "DesiredState": t["desired_state"],
        "NetworksAttachments": [
            {
                "Network": {
                    "ID": a["network_id"],
                    "Spec": {"Name": networks.get(a["network_id"], {}).get("name", "")},
                },
                "Addresses": [a["address"]],
            }
            for a in t["networks"]
        ],
        "Spec": {"ContainerSpec": {}},
    }


def render_node(n: dict, leader_id: str | None, reachable: bool = True) -> dict:
    out = {
        "ID": n["id"],
        "Version": {"Index": n["version"]},
        "CreatedAt": n["created"],
        "UpdatedAt": n["updated"],
        "Spec": {"Role": n["role"], "Availability": n["availability"], "Labels": {}},
        "Description": {
            "Hostname": n["hostname"],
            "Platform": {"Architecture": "x86_64", "OS": "linux"},
            "Engine": {"EngineVersion": ENGINE_VERSION},
            "TLSInfo": {},
        },
        "Status": {"State": n["state"], "Addr": n["addr"]},
    }
    if n["role"] == "manager":
        out["ManagerStatus"] = {
            "Leader": n["id"] == leader_id,
            "Reachability": "reachable" if reachable else "unreachable",
            "Addr": f"{n['addr']}:2377",
        }
    return out


def join_token(digest: str, secret: str) -> str:
    return f"SWMTKN-1-{digest}-{secret}"


def split_token(token: Any) -> tuple[str, str]:
    if not isinstance(token, str) or not token.startswith("SWMTKN-1-"):
        raise bad("JoinToken", "invalid join token: it must look like SWMTKN-1-<digest>-<secret>")
    parts = token.split("-")
    if len(parts) != 4 or not parts[2] or not parts[3]:
        raise bad("JoinToken", "invalid join token: it must look like SWMTKN-1-<digest>-<secret>")
    return parts[2], parts[3]


def random_b36(n: int) -> str:
    return "".join(secrets.choice(_B36) for _ in range(n))


def heartbeat_period_s(spec: dict, prefix: str) -> float | None:
    """``Dispatcher.HeartbeatPeriod`` of a SwarmSpec (nanoseconds, as Docker sends it) in
    seconds, or None when absent; anything else is a 400 naming the field."""
    disp = spec.get("Dispatcher")
    if disp is None:
        return None
    field = f"{prefix}Dispatcher.HeartbeatPeriod"
    if not isinstance(disp, dict):
        raise bad(f"{prefix}Dispatcher", "Dispatcher must be an object")
    ns = disp.get("HeartbeatPeriod")
    if ns is None or ns == 0:
        return None  # docker sends 0 for "unchanged"
    if isinstance(ns, bool) or not isinstance(ns, int) or not 10**9 <= ns <= 3600 * 10**9:
        raise bad(field, f"{field} must be 1 s to 1 h in nanoseconds, not {ns!r}")
    return ns / 1e9


__all__ = [
    "heartbeat_period_s",
    "API_VERSION",
    "parse_network_create",
    "parse_service_spec",
    "render_network",
    "render_node",
    "render_service",
    "render_task",
    "service_argv",
    "service_network_ids",
]
