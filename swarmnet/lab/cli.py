"""``swarmnet lab up|down|status|exec|stop|start``: argparse wiring over swarmnet.lab.netns.

``register(subparsers)`` adds the ``lab`` command to the top-level CLI; each subcommand sets
``func(args) -> exit code``. Errors print one line (plus an agent's log tail where useful)
and exit 1; ``exec`` exits with the command's own status.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace

from swarmnet.lab import netns
from swarmnet.lab.netns import LabConfig, LabError


def _guard(fn):
    """Turn a LabError into a message and exit status 1, not a traceback."""

    def run(args: argparse.Namespace) -> int:
        try:
            return fn(args)
        except LabError as e:
            print(f"swarmnet lab: {e}", file=sys.stderr)
            return 1

    return run


def _print_table(doc: dict) -> None:
    rows = [("HOST", "ROLE", "UNDERLAY IP", "STATE", "PID", "NETNS", "API")]
    for h in doc["hosts"]:
        pid = h["pid"]
        state = "running" if pid is not None else "stopped"
        rows.append(
            (
                h["host"],
                str(h["role"] or "-"),
                h["underlay_ip"],
                state,
                str(pid or "-"),
                h["netns"],
                str(h["api"] or "-"),
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    print(
        f"lab {doc['name']}: underlay {doc['underlay']['netns']} bridge {doc['underlay']['bridge']}"
    )
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())


def _vm():
    from swarmnet.lab import vm

    return vm


def _up(args: argparse.Namespace) -> int:
    if args.kind == "vm":
        name = args.name or "swarmnet"
        if args.no_agents:
            _vm().up(name, args.hosts or 2)
        else:
            # Agents in every guest and a swarm (h1 the manager), as the netns lab does.
            from swarmnet.lab import vm_swarm

            extra = ("--lb-backend", args.lb_backend) if args.lb_backend else ()
            vm_swarm.up(name, vm_swarm.SwarmConfig(hosts=args.hosts or 3, agent_args=extra))
        _print_table(_vm().status(name))
        if not args.no_agents:
            print(f"\ntry: swarmnet lab exec --kind vm --name {name} h1 -- swarmnet node ls")
        return 0
    cfg = LabConfig()
    if args.file:
        cfg = netns.load_topology(args.file, cfg)
    overrides = {
        k: v
        for k, v in (
            ("name", args.name),
            ("hosts", args.hosts),
            ("managers", args.managers),
            ("cidr", args.cidr),
            ("mtu", args.mtu),
        )
        if v is not None
    }
    cfg = replace(cfg, **overrides)
    if args.managers is None and cfg.managers > cfg.hosts:
        cfg = replace(cfg, managers=cfg.hosts)  # `--hosts 1` over a 3-manager file just works
    cfg.validate()  # before the try: a bad flag has built nothing to inspect
    try:
        netns.up(cfg, agents=not args.no_agents)
    except LabError as e:
        raise LabError(
            f"{e}\n(the lab is left as it was for inspection; "
            f"`swarmnet lab down --name {cfg.name}` removes it)"
        ) from e
    _print_table(netns.status(cfg.name))
    if not args.no_agents:
        opt = "" if cfg.name == "swarmnet" else f" --name {cfg.name}"
        print(f"\ntry: swarmnet lab exec{opt} h1 -- swarmnet node ls")
    return 0


def _down(args: argparse.Namespace) -> int:
    if args.kind == "vm":
        _vm().down(args.name or "swarmnet")
        return 0
    netns.down(args.name or "swarmnet")
    return 0


def _status(args: argparse.Namespace) -> int:
    name = args.name or "swarmnet"
    doc = _vm().status(name) if args.kind == "vm" else netns.status(name)
    if args.format == "json":
        print(json.dumps(doc))
    else:
        _print_table(doc)
    return 0


def _exec(args: argparse.Namespace) -> int:
    # REMAINDER swallows options written after HOST (`exec h1 --name x -- cmd`): take a
    # leading --name back, then the `--` that ends the lab's own options.
    argv, name = list(args.cmd), args.name
    while argv and (argv[0] == "--name" or argv[0].startswith("--name=")):
        if argv[0] == "--name":
            if len(argv) < 2:
                raise LabError("--name needs a value")
            name, argv = argv[1], argv[2:]
        else:
            name, argv = argv[0].split("=", 1)[1], argv[1:]
    if argv and argv[0] == "--":
        argv = argv[1:]
    if args.kind == "vm":
        if argv and argv[0] == "swarmnet":  # the guest has no `swarmnet` on PATH, nor its API
            from swarmnet.lab import vm_swarm

            argv = [vm_swarm.PY, "-m", "swarmnet", "-H", vm_swarm.API, *argv[1:]]
        rc, out, err = _vm().exec_on(name or "swarmnet", args.host, argv)
        sys.stdout.write(out)
        sys.stderr.write(err)
        return rc
    return netns.exec_on(name or "swarmnet", args.host, argv)


def _stop(args: argparse.Namespace) -> int:
    killed = netns.stop(args.name or "swarmnet", args.host)
    print(f"{args.host}: stopped ({killed} processes killed, underlay link down)")
    return 0


def _start(args: argparse.Namespace) -> int:
    pid = netns.start(args.name or "swarmnet", args.host)
    print(f"{args.host}: running (agent pid {pid}, underlay link up)")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from swarmnet.lab import demo

    return demo.run(args.name or "swarmnet", hosts=args.hosts, keep=not args.down)


def register(subparsers) -> argparse.ArgumentParser:
    """Add ``lab`` and its subcommands to a top-level ``add_subparsers()`` object."""
    # --name on each subcommand (not on `lab`), so that it may follow the subcommand.
    # Default None and resolved late: `up` must let a topology file's name count.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--name", default=None, metavar="LAB", help="lab name (default: swarmnet)")
    common.add_argument(
        "--kind",
        choices=("netns", "vm"),
        default="netns",
        help="netns: hosts are network namespaces (default); vm: qemu guests on Debian's kernel",
    )
    lab = subparsers.add_parser(
        "lab", help="a local lab: hosts as network namespaces, one agent each"
    )
    sub = lab.add_subparsers(dest="lab_command", metavar="COMMAND", required=True)

    p = sub.add_parser("up", parents=[common], help="build the lab and form a swarm")
    p.add_argument("--file", "-f", help="topology file (cluster-compose/*.toml)")
    p.add_argument("--hosts", type=int, help="number of hosts, 1..200 (default 3)")
    p.add_argument("--managers", type=int, help="number of managers, <= hosts (default 1)")
    p.add_argument("--cidr", help="underlay network (default 198.51.100.0/24)")
    p.add_argument("--mtu", type=int, help="underlay MTU (default 1500)")
    p.add_argument("--no-agents", action="store_true", help="build namespaces and underlay only")
    p.add_argument(
        "--lb-backend", choices=("auto", "ipvs", "nft"), help="agents' --lb-backend (vm kind)"
    )
    p.set_defaults(func=_guard(_up))

    p = sub.add_parser("down", parents=[common], help="remove everything the lab made")
    p.set_defaults(func=_guard(_down))

    p = sub.add_parser("status", parents=[common], help="list the lab's hosts")
    p.add_argument("--format", choices=("table", "json"), default="table")
    p.set_defaults(func=_guard(_status))

    p = sub.add_parser(
        "exec",
        parents=[common],
        help="run a command on a host, with SWARMNET_HOST set to its API",
        usage="%(prog)s [--name LAB] HOST -- CMD...",
    )
    p.add_argument("host", metavar="HOST")
    p.add_argument("cmd", nargs=argparse.REMAINDER, metavar="CMD")
    p.set_defaults(func=_guard(_exec))

    p = sub.add_parser("stop", parents=[common], help="kill a host: processes, underlay link")
    p.add_argument("host", metavar="HOST")
    p.set_defaults(func=_guard(_stop))

    p = sub.add_parser("start", parents=[common], help="bring a stopped host back")
    p.add_argument("host", metavar="HOST")
    p.set_defaults(func=_guard(_start))

    p = sub.add_parser(
        "demo", parents=[common], help="up + an overlay + a replicated web service + traffic shown"
    )
    p.add_argument("--hosts", type=int, default=3, help="number of hosts (default 3)")
    p.add_argument("--down", action="store_true", help="remove the lab at the end")
    p.set_defaults(func=_guard(_demo))
    return lab
