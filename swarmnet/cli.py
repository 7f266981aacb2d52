"""The swarmnet command line: docker's verbs and flags, talking to the local agent's API.

Tables by default, ``--format json`` for scripts (one JSON object per line, docker's field
names). Errors are one readable line on stderr and a non-zero exit code.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

from swarmnet.api.client import APIError, Client, q

LAB_ROOT = Path("/run/swarmnet/lab")


# ---- output helpers -----------------------------------------------------------------


def _table(rows: list[dict], columns: list[tuple[str, str]]) -> None:
    headers = [h for h, _ in columns]
    data = [[str(r.get(k, "")) for _, k in columns] for r in rows]
    widths = [max([len(h)] + [len(d[i]) for d in data]) for i, h in enumerate(headers)]
    print("   ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip())
    for d in data:
        print("   ".join(c.ljust(w) for c, w in zip(d, widths, strict=True)).rstrip())


def _emit(args, rows: list[dict], columns: list[tuple[str, str]]) -> None:
    if getattr(args, "format", None) == "json":
        for r in rows:
            print(json.dumps(r))
    else:
        _table(rows, columns)


def _ago(ts: str) -> str:
    try:
        from datetime import UTC, datetime

        t = datetime.strptime(ts[:26].rstrip("Z"), "%Y-%m-%dT%H:%M:%S.%f").replace(tzinfo=UTC)
        s = int((datetime.now(UTC) - t).total_seconds())
    except ValueError:
        return ""
    if s < 60:
        return f"{max(s, 1)} second{'s' if s != 1 else ''} ago"
    if s < 3600:
        return f"{s // 60} minute{'s' if s // 60 != 1 else ''} ago"
    return f"{s // 3600} hour{'s' if s // 3600 != 1 else ''} ago"


def _client(args) -> Client:
    host = args.host
    if host is None and args.lab:
        host = f"unix://{LAB_ROOT / args.lab / 'h1' / 'api.sock'}"
    return Client(host)


def _strip_dashes(cmd: list[str]) -> list[str]:
    return cmd[1:] if cmd and cmd[0] == "--" else cmd


# ---- swarm --------------------------------------------------------------------------


def cmd_swarm_init(args) -> int:
    c = _client(args)
    body: dict = {}
    if args.advertise_addr:
        body["AdvertiseAddr"] = args.advertise_addr
    if args.default_addr_pool:
        body["DefaultAddrPool"] = args.default_addr_pool
    if args.default_addr_pool_mask_length:
        body["SubnetSize"] = args.default_addr_pool_mask_length
    if args.dispatcher_heartbeat:
        body["Spec"] = {"Dispatcher": {"HeartbeatPeriod": _ns(args.dispatcher_heartbeat)}}
    node_id = c.post("/swarm/init", body)
    tokens = c.get("/swarm")["JoinTokens"]
    addr = c.get("/info")["Swarm"]["NodeAddr"]
    print(f"Swarm initialized: current node ({node_id}) is now a manager.\n")
    print("To add a worker to this swarm, run the following command:\n")
    print(f"    swarmnet swarm join --token {tokens['Worker']} {addr}:2377\n")
    return 0


def cmd_swarm_join(args) -> int:
    c = _client(args)
    body = {"RemoteAddrs": [args.addr], "JoinToken": args.token}
    if args.advertise_addr:
        body["AdvertiseAddr"] = args.advertise_addr
    c.post("/swarm/join", body)
    manager = c.get("/info")["Swarm"]["ControlAvailable"]
    print(f"This node joined a swarm as a {'manager' if manager else 'worker'}.")
    return 0


def cmd_swarm_rotate_gossip_key(args) -> int:
    _client(args).post("/swarmnet/rotate-gossip-key", {})
    print("Gossip key rotated on every node.")
    return 0


def print_json(doc: object) -> None:
    print(json.dumps(doc, indent=4))


def cmd_swarm_rotate_ipsec_key(args) -> int:
    print_json(_client(args).post("/swarmnet/ipsec/rotate", {}))
    return 0


def cmd_swarm_ipsec(args) -> int:
    print_json(_client(args).get("/swarmnet/ipsec"))
    return 0


def _ns(seconds: float) -> int:
    return int(round(seconds * 1e9))


def cmd_swarm_update(args) -> int:
    c = _client(args)
    if args.dispatcher_heartbeat:
        version = c.get("/swarm")["Version"]["Index"]
        spec = {"Dispatcher": {"HeartbeatPeriod": _ns(args.dispatcher_heartbeat)}}
        c.post("/swarm/update", spec, version=version)
    body = {
        k: v
        for k, v in (
            ("interval_s", args.ipsec_rotation_interval),
            ("threshold_packets", args.ipsec_rotation_packets),
            ("grace_s", args.ipsec_rotation_grace),
        )
        if v is not None
    }
    if not body and not args.dispatcher_heartbeat:
        print("swarm update: nothing to change (see --help)", file=sys.stderr)
        return 2
    if body:
        print_json(c.post("/swarmnet/ipsec/config", body))
    return 0


def cmd_swarm_join_token(args) -> int:
    c = _client(args)
    if args.rotate:
        version = c.get("/swarm")["Version"]["Index"]
        c.post("/swarm/update", {}, version=version, **{f"rotate{args.role.capitalize()}Token": "true"})
    sw = c.get("/swarm")
    token = sw["JoinTokens"]["Worker" if args.role == "worker" else "Manager"]
    if args.quiet:
        print(token)
        return 0
    addr = c.get("/info")["Swarm"]["NodeAddr"]
    print(f"To add a {args.role} to this swarm, run the following command:\n")
    print(f"    swarmnet swarm join --token {token} {addr}:2377\n")
    return 0


def cmd_swarm_leave(args) -> int:
    _client(args).post("/swarm/leave", {}, force="true" if args.force else None)
    print("Node left the swarm.")
    return 0


# ---- nodes --------------------------------------------------------------------------


def cmd_node_ls(args) -> int:
    c = _client(args)
    me = c.get("/info")["Swarm"]["NodeID"]
    rows = []
    for n in c.get("/nodes"):
        ms = n.get("ManagerStatus")
        rows.append(
            {
                "ID": n["ID"] + (" *" if n["ID"] == me else ""),
                "Hostname": n["Description"]["Hostname"],
                "Status": n["Status"]["State"].capitalize(),
                "Availability": n["Spec"]["Availability"].capitalize(),
                "ManagerStatus": ("Leader" if ms["Leader"] else ms["Reachability"].capitalize()) if ms else "",
                "EngineVersion": n["Description"]["Engine"]["EngineVersion"],
            }
        )
    _emit(
        args,
        rows,
        [("ID", "ID"), ("HOSTNAME", "Hostname"), ("STATUS", "Status"), ("AVAILABILITY", "Availability"),
         ("MANAGER STATUS", "ManagerStatus"), ("ENGINE VERSION", "EngineVersion")],
    )
    return 0


def cmd_node_inspect(args) -> int:
    c = _client(args)
    print(json.dumps([c.get(f"/nodes/{q(n)}") for n in args.nodes], indent=4))
    return 0


def _node_update(c: Client, key: str, **changes: str) -> None:
    n = c.get(f"/nodes/{q(key)}")
    spec = dict(n["Spec"], **changes)
    c.post(f"/nodes/{q(key)}/update", spec, version=n["Version"]["Index"])


def cmd_node_promote(args) -> int:
    c = _client(args)
    for key in args.nodes:
        _node_update(c, key, Role="manager")
        print(f"Node {key} promoted to a manager in the swarm.")
    return 0


def cmd_node_demote(args) -> int:
    c = _client(args)
    for key in args.nodes:
        _node_update(c, key, Role="worker")
        print(f"Manager {key} demoted in the swarm.")
    return 0


def cmd_node_update(args) -> int:
    c = _client(args)
    changes = {}
    if args.availability:
        changes["Availability"] = args.availability
    if args.role:
        changes["Role"] = args.role
    _node_update(c, args.node, **changes)
    print(args.node)
    return 0


def cmd_node_rm(args) -> int:
    c = _client(args)
    for key in args.nodes:
        c.delete(f"/nodes/{q(key)}", **({"force": "1"} if args.force else {}))
        print(key)
    return 0


# ---- networks -----------------------------------------------------------------------


def cmd_network_create(args) -> int:
    opts = {}
    for o in args.opt or []:
        k, _, v = o.partition("=")
        opts[k] = v
    body = {
        "Name": args.name,
        "Driver": args.driver,
        "Attachable": args.attachable,
        "Options": opts,
        "IPAM": {"Driver": "default", "Config": [{"Subnet": args.subnet}] if args.subnet else []},
    }
    print(_client(args).post("/networks/create", body)["Id"])
    return 0


def cmd_network_ls(args) -> int:
    rows = [
        {"ID": n["Id"][:12], "Name": n["Name"], "Driver": n["Driver"], "Scope": n["Scope"],
         "Subnet": n["IPAM"]["Config"][0]["Subnet"] if n["IPAM"]["Config"] else "",
         "VNI": n["Options"].get("com.docker.network.driver.overlay.vxlanid_list", "")}
        for n in _client(args).get("/networks")
    ]
    _emit(args, rows, [("NETWORK ID", "ID"), ("NAME", "Name"), ("DRIVER", "Driver"), ("SCOPE", "Scope"),
                       ("SUBNET", "Subnet"), ("VNI", "VNI")])
    return 0


def cmd_network_inspect(args) -> int:
    c = _client(args)
    print(json.dumps([c.get(f"/networks/{q(n)}") for n in args.networks], indent=4))
    return 0


def _remove_each(args, collection: str, keys: list[str]) -> int:
    """`docker X rm A B C`: try every one, print what went, one error line per failure."""
    c = _client(args)
    rc = 0
    for key in keys:
        try:
            c.delete(f"/{collection}/{q(key)}")
            print(key)
        except APIError as e:
            print(f"Error response from daemon: {e.message}", file=sys.stderr)
            rc = 1
    return rc


def cmd_network_rm(args) -> int:
    return _remove_each(args, "networks", args.networks)


# ---- services -----------------------------------------------------------------------


def _service_body(args) -> dict:
    command = _strip_dashes(args.command or [])
    if not command:
        raise APIError(400, "a command to run is required: swarmnet service create --name N -- COMMAND...")
    return {
        "Name": args.name,
        "TaskTemplate": {
            "ContainerSpec": {"Image": command[0], "Args": command[1:], "Env": args.env or []},
            "Networks": [{"Target": n} for n in args.network or []],
        },
        "Mode": {"Replicated": {"Replicas": args.replicas}},
        "EndpointSpec": {"Mode": args.endpoint_mode}
        | ({"Ports": [parse_publish(p) for p in args.publish]} if args.publish else {}),
    }


def parse_publish(text: str) -> dict:
    """``--publish`` as docker takes it: ``[mode=ingress|host,]PUBLISHED:TARGET[/tcp|udp]``,
    ``TARGET`` alone (a published port is picked), or the long form
    ``published=8080,target=80,protocol=tcp,mode=host``. Values are checked by the API,
    which names the field at fault; here only the shape is parsed."""
    port: dict = {}
    short = None
    for part in text.split(","):
        key, eq, value = part.partition("=")
        if not eq:
            if short is not None:
                raise APIError(400, f"invalid --publish {text!r}")
            short = part
            continue
        key = key.strip().lower()
        fields = {"published": "PublishedPort", "target": "TargetPort",
                  "protocol": "Protocol", "mode": "PublishMode"}
        if key not in fields:
            raise APIError(400, f"invalid --publish {text!r}: unknown field {key!r}")
        port[fields[key]] = _port_value(value) if key in ("published", "target") else value
    if short is not None:
        spec, _, proto = short.partition("/")
        if proto:
            port["Protocol"] = proto
        published, colon, target = spec.rpartition(":")
        port["TargetPort"] = _port_value(target)
        if colon:
            port["PublishedPort"] = _port_value(published)
    return port


def _port_value(value: str):
    """An int when it is one; anything else goes to the API as is (it names the field)."""
    try:
        return int(value)
    except ValueError:
        return value


def _wait_converged(c: Client, service: str, timeout_s: float = 120.0, quiet: bool = False) -> int:
    """Show progress until every replica runs (like docker's progress bars, in lines)."""
    deadline = time.monotonic() + timeout_s
    shown: dict[str, str] = {}
    nodes = {}
    while True:
        svc = c.get(f"/services/{q(service)}")
        want = svc["Spec"]["Mode"]["Replicated"]["Replicas"]
        tasks = c.get("/tasks", filters=json.dumps({"service": {svc["ID"]: True}}))
        live = [t for t in tasks if t["DesiredState"] == "running"]
        for t in live:
            if t["NodeID"] not in nodes:
                try:
                    nodes[t["NodeID"]] = c.get(f"/nodes/{t['NodeID']}")["Description"]["Hostname"]
                except APIError:
                    nodes[t["NodeID"]] = t["NodeID"][:12]
            line = f"{t['Name']} on {nodes[t['NodeID']]}: {t['Status']['State']}"
            if t["Status"]["Err"]:
                line += f" ({t['Status']['Err']})"
            if shown.get(t["ID"]) != line and not quiet:
                print(line, flush=True)
                shown[t["ID"]] = line
        running = sum(1 for t in live if t["Status"]["State"] == "running")
        stopping = [t for t in tasks if t["DesiredState"] != "running"]
        if running == want and len(live) == want and not stopping:
            if not quiet:
                print(f"overall progress: {running} out of {want} tasks running: converged")
            return 0
        if time.monotonic() > deadline:
            print(f"overall progress: {running} out of {want} tasks running: timed out", file=sys.stderr)
            return 1
        time.sleep(0.2)


def cmd_service_create(args) -> int:
    c = _client(args)
    sid = c.post("/services/create", _service_body(args))["ID"]
    print(sid)
    if args.detach:
        return 0
    return _wait_converged(c, sid)


def cmd_service_ls(args) -> int:
    rows = []
    for s in _client(args).get("/services", status="true"):
        st = s["ServiceStatus"]
        cs = s["Spec"]["TaskTemplate"]["ContainerSpec"]
        rows.append(
            {"ID": s["ID"][:12], "Name": s["Spec"]["Name"], "Mode": "replicated",
             "Replicas": f"{st['RunningTasks']}/{st['DesiredTasks']}",
             "Ports": ", ".join(
                 f"*:{p['PublishedPort']}->{p['TargetPort']}/{p['Protocol']}"
                 + ("" if p["PublishMode"] == "ingress" else " (host)")
                 for p in s.get("Endpoint", {}).get("Ports", [])
             ),
             "VirtualIPs": ", ".join(v["Addr"] for v in s.get("Endpoint", {}).get("VirtualIPs", [])),
             "Image": " ".join([cs["Image"]] + cs.get("Args", []))[:40]}
        )
    _emit(args, rows, [("ID", "ID"), ("NAME", "Name"), ("MODE", "Mode"), ("REPLICAS", "Replicas"),
                       ("COMMAND", "Image"), ("PORTS", "Ports")])
    return 0


def cmd_service_ps(args) -> int:
    c = _client(args)
    nodes = {n["ID"]: n["Description"]["Hostname"] for n in c.get("/nodes")}
    rows = []
    for svc in args.services:
        s = c.get(f"/services/{q(svc)}")
        for t in c.get("/tasks", filters=json.dumps({"service": {s["ID"]: True}})):
            rows.append(
                {"ID": t["ID"][:12], "Name": t["Name"], "Node": nodes.get(t["NodeID"], t["NodeID"][:12]),
                 "DesiredState": t["DesiredState"].capitalize(),
                 "CurrentState": f"{t['Status']['State'].capitalize()} {_ago(t['Status']['Timestamp'])}",
                 "Error": t["Status"]["Err"],
                 "Addresses": ",".join(a for na in t["NetworksAttachments"] for a in na["Addresses"])}
            )
    _emit(args, rows, [("ID", "ID"), ("NAME", "Name"), ("NODE", "Node"), ("DESIRED STATE", "DesiredState"),
                       ("CURRENT STATE", "CurrentState"), ("ERROR", "Error"), ("ADDRESSES", "Addresses")])
    return 0


def cmd_service_inspect(args) -> int:
    c = _client(args)
    print(json.dumps([c.get(f"/services/{q(s)}") for s in args.services], indent=4))
    return 0


def cmd_service_scale(args) -> int:
    c = _client(args)
    rc = 0
    for item in args.pairs:
        name, sep, n = item.partition("=")
        if not sep or not n.lstrip("-").isdigit():
            print(f"invalid scale specifier {item!r}: use SERVICE=REPLICAS", file=sys.stderr)
            return 2
        s = c.get(f"/services/{q(name)}")
        spec = s["Spec"]
        spec["Mode"] = {"Replicated": {"Replicas": int(n)}}
        c.post(f"/services/{s['ID']}/update", spec, version=s["Version"]["Index"])
        print(f"{name} scaled to {n}")
        if not args.detach:
            rc |= _wait_converged(c, s["ID"])
    return rc


def cmd_service_rm(args) -> int:
    return _remove_each(args, "services", args.services)


# ---- exec and agent -----------------------------------------------------------------


def cmd_exec(args) -> int:
    from swarmnet.runtime.enter import exec_argv

    command = _strip_dashes(args.command or [])
    if not command:
        print("usage: swarmnet exec TASK -- COMMAND...", file=sys.stderr)
        return 2
    tasks = _client(args).get("/swarmnet/local-tasks")
    match = [t for t in tasks if args.task in (t["name"], t["id"]) or t["id"].startswith(args.task)]
    match = [t for t in match if t["pid"]]
    if len(match) != 1:
        names = ", ".join(sorted(t["name"] for t in tasks if t["pid"])) or "none"
        print(f"no single running task {args.task!r} on this node (running here: {names})", file=sys.stderr)
        return 1
    argv = exec_argv(match[0]["pid"], command)
    os.execvp(argv[0], argv)
    return 127  # not reached


def cmd_agent(args) -> int:
    import asyncio

    from swarmnet.agent import AgentOptions, run_agent

    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    opts = AgentOptions(
        data_dir=Path(args.data_dir),
        advertise_addr=args.advertise_addr,
        api=args.api or "unix:///run/swarmnet/swarmnet.sock",
        hostname=args.hostname or os.uname().nodename,
        netns_prefix=args.netns_prefix,
        insecure_tcp=args.insecure,
        tlsverify=args.tlsverify,
        tlscacert=Path(args.tlscacert) if args.tlscacert else None,
        tlscert=Path(args.tlscert) if args.tlscert else None,
        tlskey=Path(args.tlskey) if args.tlskey else None,
        lb_backend=args.lb_backend,
    )
    try:
        import uvloop

        uvloop.run(run_agent(opts))
    except ImportError:  # pragma: no cover - uvloop is a hard dependency; keep the agent usable
        asyncio.run(run_agent(opts))
    return 0


# ---- parser -------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="swarmnet", description="Multi-host overlay networks, swarm style.")
    p.add_argument("-H", "--host", help="agent API (unix:///path or tcp://ip:port; env SWARMNET_HOST)")
    p.add_argument("--lab", help="drive the swarm of the netns lab LAB (its h1 agent)")
    sub = p.add_subparsers(dest="cmd", required=True)

    a = sub.add_parser("agent", help="run the agent of this host (foreground)")
    a.add_argument("--data-dir", required=True)
    a.add_argument("--advertise-addr", required=True)
    a.add_argument("--api", help="unix:///run/swarmnet/NAME.sock (default) or tcp://127.0.0.1:2375")
    a.add_argument("--hostname")
    a.add_argument("--netns-prefix", default="swarmnet-", help="prefix of task sandbox namespaces")
    a.add_argument("--insecure", action="store_true", help="allow a TCP API on a non-loopback address WITHOUT authentication")
    a.add_argument("--tlsverify", action="store_true", help="TCP API over TLS; clients need a certificate signed by --tlscacert")
    a.add_argument("--tlscacert", help="with --tlsverify: the CA that signs API clients' certificates")
    a.add_argument("--tlscert", help="with --tlsverify: the API server's certificate (chain)")
    a.add_argument("--tlskey", help="with --tlsverify: the API server's key")
    a.add_argument("--lb-backend", choices=["auto", "ipvs", "nft"], default="auto", help="load balancer of task sandboxes: IPVS where the kernel has it (auto), or forced")
    a.add_argument("--debug", action="store_true")
    a.set_defaults(func=cmd_agent)

    sw = sub.add_parser("swarm", help="manage the swarm").add_subparsers(dest="sub", required=True)
    x = sw.add_parser("init")
    x.add_argument("--advertise-addr")
    x.add_argument("--default-addr-pool", action="append")
    x.add_argument("--default-addr-pool-mask-length", type=int)
    x.add_argument("--dispatcher-heartbeat", type=float, metavar="SECONDS", help="node heartbeat period (default 5 s); a node is down after two")
    x.set_defaults(func=cmd_swarm_init)
    x = sw.add_parser("join")
    x.add_argument("--token", required=True)
    x.add_argument("--advertise-addr")
    x.add_argument("addr", metavar="HOST:PORT")
    x.set_defaults(func=cmd_swarm_join)
    x = sw.add_parser("join-token")
    x.add_argument("-q", "--quiet", action="store_true")
    x.add_argument("--rotate", action="store_true")
    x.add_argument("role", choices=["worker", "manager"])
    x.set_defaults(func=cmd_swarm_join_token)
    x = sw.add_parser("rotate-gossip-key", help="new gossip key on every node (install, use, remove)")
    x.set_defaults(func=cmd_swarm_rotate_gossip_key)
    x = sw.add_parser("rotate-ipsec-key", help="new key for encrypted overlays now (make-before-break)")
    x.set_defaults(func=cmd_swarm_rotate_ipsec_key)
    x = sw.add_parser("ipsec", help="the encrypted overlays' key schedule (no key material)")
    x.set_defaults(func=cmd_swarm_ipsec)
    x = sw.add_parser("update", help="cluster settings")
    x.add_argument("--dispatcher-heartbeat", type=float, metavar="SECONDS", help="node heartbeat period (default 5 s); a node is down after two")
    x.add_argument("--ipsec-rotation-interval", type=float, metavar="SECONDS", help="rotate keys of encrypted overlays this often (default 12 h)")
    x.add_argument("--ipsec-rotation-packets", type=int, metavar="N", help="rotate once a node sent N packets under the current key (default 2^31)")
    x.add_argument("--ipsec-rotation-grace", type=float, metavar="SECONDS", help="keep the old key this long after every node switched (default 30 s)")
    x.set_defaults(func=cmd_swarm_update)
    x = sw.add_parser("leave")
    x.add_argument("-f", "--force", action="store_true")
    x.set_defaults(func=cmd_swarm_leave)

    nd = sub.add_parser("node", help="manage nodes").add_subparsers(dest="sub", required=True)
    x = nd.add_parser("ls")
    x.add_argument("--format", choices=["table", "json"], default="table")
    x.set_defaults(func=cmd_node_ls)
    x = nd.add_parser("inspect")
    x.add_argument("nodes", nargs="+")
    x.set_defaults(func=cmd_node_inspect)
    x = nd.add_parser("promote")
    x.add_argument("nodes", nargs="+")
    x.set_defaults(func=cmd_node_promote)
    x = nd.add_parser("demote")
    x.add_argument("nodes", nargs="+")
    x.set_defaults(func=cmd_node_demote)
    x = nd.add_parser("update")
    x.add_argument("--availability", choices=["active", "pause", "drain"])
    x.add_argument("--role", choices=["worker", "manager"])
    x.add_argument("node")
    x.set_defaults(func=cmd_node_update)
    x = nd.add_parser("rm")
    x.add_argument("-f", "--force", action="store_true")
    x.add_argument("nodes", nargs="+")
    x.set_defaults(func=cmd_node_rm)

    nw = sub.add_parser("network", help="manage overlay networks").add_subparsers(dest="sub", required=True)
    x = nw.add_parser("create")
    x.add_argument("-d", "--driver", default="overlay")
    x.add_argument("--subnet")
    x.add_argument("--attachable", action="store_true")
    x.add_argument("-o", "--opt", action="append", help="driver option KEY[=VALUE] (e.g. encrypted)")
    x.add_argument("name")
    x.set_defaults(func=cmd_network_create)
    x = nw.add_parser("ls")
    x.add_argument("--format", choices=["table", "json"], default="table")
    x.set_defaults(func=cmd_network_ls)
    x = nw.add_parser("inspect")
    x.add_argument("networks", nargs="+")
    x.set_defaults(func=cmd_network_inspect)
    x = nw.add_parser("rm")
    x.add_argument("networks", nargs="+")
    x.set_defaults(func=cmd_network_rm)

    sv = sub.add_parser("service", help="manage services").add_subparsers(dest="sub", required=True)
    x = sv.add_parser("create")
    x.add_argument("--name", required=True)
    x.add_argument("--replicas", type=int, default=1)
    x.add_argument("--network", action="append")
    x.add_argument("-e", "--env", action="append")
    x.add_argument("--endpoint-mode", default="vip", help="vip (default) or dnsrr")
    x.add_argument(
        "-p", "--publish", action="append",
        help="[mode=ingress|host,]PUBLISHED:TARGET[/tcp|udp] or published=P,target=T,protocol=tcp,mode=host",
    )
    x.add_argument("-d", "--detach", action="store_true")
    x.add_argument("command", nargs=argparse.REMAINDER)
    x.set_defaults(func=cmd_service_create)
    x = sv.add_parser("ls")
    x.add_argument("--format", choices=["table", "json"], default="table")
    x.set_defaults(func=cmd_service_ls)
    x = sv.add_parser("ps")
    x.add_argument("--format", choices=["table", "json"], default="table")
    x.add_argument("services", nargs="+")
    x.set_defaults(func=cmd_service_ps)
    x = sv.add_parser("inspect")
    x.add_argument("services", nargs="+")
    x.set_defaults(func=cmd_service_inspect)
    x = sv.add_parser("scale")
    x.add_argument("-d", "--detach", action="store_true")
    x.add_argument("pairs", nargs="+", metavar="SERVICE=REPLICAS")
    x.set_defaults(func=cmd_service_scale)
    x = sv.add_parser("rm")
    x.add_argument("services", nargs="+")
    x.set_defaults(func=cmd_service_rm)

    x = sub.add_parser("exec", help="run a command inside a local task's sandbox")
    x.add_argument("task")
    x.add_argument("command", nargs=argparse.REMAINDER)
    x.set_defaults(func=cmd_exec)

    from swarmnet.gossip.cli import register as register_gossip
    from swarmnet.lab.cli import register as register_lab

    register_lab(sub)
    register_gossip(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except APIError as e:
        print(f"Error response from daemon: {e.message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
