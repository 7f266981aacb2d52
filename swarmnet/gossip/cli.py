"""``swarmnet gossip agent``: the membership layer alone, like ``serf agent`` (issue 5 item 4).

It is the interop and debugging tool: it joins (or is joined by) serf agents and our own,
and prints every membership event as one JSON line on stdout, flushed:

    {"event": "member-join", "node": "s1", "addr": "127.0.0.1:7946"}

(``member-join``, ``member-leave``, ``member-failed``, ``member-update``). Diagnostics go to
stderr, also as JSON lines: ``{"warning": ...}`` and ``{"metrics": {...}}``, the latter on
SIGUSR1 and at exit (drop counters per reason, serf message counters, core counters).
SIGINT/SIGTERM leave gracefully, then exit 0.

Serf compatibility, kept here because it is Serf's layer and not memberlist's: our Meta is
Serf's empty tag map (``ff 80``) so ``serf members`` shows no bogus ``role=``; we gossip a
Serf join intent after joining and a Serf leave intent before leaving (without it serf lists
a graceful leave as ``failed``, MEMBERLIST-WIRE.md 6.5); every other Serf message (user
events, queries, their responses) is counted by type and otherwise ignored.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import ipaddress
import json
import signal
import sys
from typing import Any

import msgpack

from swarmnet.gossip.config import GossipConfig
from swarmnet.gossip.core import MemberEvent
from swarmnet.gossip.driver import GossipNode
from swarmnet.gossip.keyring import Keyring, KeyringError

DEFAULT_PORT = 7946
SERF_TAGS_EMPTY = b"\xff" + msgpack.packb({})  # Serf protocol >= 3 tags: 0xff + msgpack map
_EVENT_NAMES = {
    "join": "member-join",
    "leave": "member-leave",
    "failed": "member-failed",
    "update": "member-update",
}
# Serf's message types (serf messages.go); APPEND ONLY, they are on the wire.
_SERF_TYPES = {
    0: "leave_intent",
    1: "join_intent",
    2: "push_pull",
    3: "user_event",
    4: "query",
    5: "query_response",
    6: "conflict_response",
    7: "key_request",
    8: "key_response",
    9: "relay",
}
INTENT_DRAIN_TIMEOUT_S = 5.0  # serf's BroadcastTimeout: wait for the leave intent to go out


def parse_hostport(text: str, default_port: int = DEFAULT_PORT) -> tuple[str, int]:
    """``IP``, ``IP:PORT``, ``[IPv6]:PORT`` or a bare IPv6 address -> (ip, port)."""
    host, port = text, default_port
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise ValueError(f"bad address {text!r}")
        if rest:
            port = int(rest[1:])
    elif text.count(":") == 1:
        host, _, p = text.partition(":")
        port = int(p)
    ipaddress.ip_address(host)  # raises ValueError for a name: we take addresses only
    if not 0 <= port < 65536:
        raise ValueError(f"bad port in {text!r}")
    return host, port


def _fmt_addr(addr: tuple[str, int] | None) -> str | None:
    if addr is None:
        return None
    host, port = addr
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class SerfShim:
    """The little of Serf's layer the agent needs: a member Lamport clock for join/leave
    intents, and counters of Serf messages by type."""

    def __init__(self, name: str):
        self.name = name
        self.clock = 1  # serf's member clock starts at 1
        self.counters: dict[str, int] = {}

    def witness(self, lt: int) -> None:
        if lt >= self.clock:
            self.clock = lt + 1

    def observe(self, payload: bytes) -> None:
        """Count a memberlist user message and witness intents' clocks. Never raises."""
        if not payload:
            self._count("serf_empty")
            return
        kind = _SERF_TYPES.get(payload[0], "unknown")
        self._count("serf_" + kind)
        if payload[0] in (0, 1):
            try:
                body = msgpack.unpackb(payload[1:], raw=True)
                lt = body.get(b"LTime") if isinstance(body, dict) else None
            except Exception:  # a malformed intent: count it, ignore it
                self._count("serf_bad")
                return
            if isinstance(lt, int) and not isinstance(lt, bool) and 0 <= lt < 1 << 64:
                self.witness(lt)

    def join_intent(self) -> bytes:
        lt = self.clock
        self.witness(lt)  # Serf.Join: send the current time, then witness it
        return b"\x01" + msgpack.packb({"LTime": lt, "Node": self.name}, use_bin_type=True)

    def leave_intent(self) -> bytes:
        lt = self.clock
        self.clock += 1  # Serf.Leave: send the current time, then increment
        body = {"LTime": lt, "Node": self.name, "Prune": False}
        return b"\x00" + msgpack.packb(body, use_bin_type=True)

    def _count(self, name: str) -> None:
        self.counters[name] = self.counters.get(name, 0) + 1


def _emit(obj: dict[str, Any], stream: Any) -> None:
    stream.write(json.dumps(obj, sort_keys=False) + "\n")
    stream.flush()


async def run_agent(args: argparse.Namespace) -> int:
    profiles = {"lan": GossipConfig.lan, "wan": GossipConfig.wan, "local": GossipConfig.local}
    bind = parse_hostport(args.bind)
    advertise = parse_hostport(args.advertise, bind[1]) if args.advertise else None
    if advertise is None and ipaddress.ip_address(bind[0]).is_unspecified:
        print("--advertise is needed when binding a wildcard address", file=sys.stderr)
        return 2
    joins = [parse_hostport(j) for j in args.join]
    keyring = Keyring()
    if args.encrypt:
        try:
            keyring.install(base64.b64decode(args.encrypt, validate=True))
        except (binascii.Error, KeyringError) as exc:
            print(f"--encrypt: {exc}", file=sys.stderr)
            return 2
    config = profiles[args.profile](bind_port=bind[1] or DEFAULT_PORT)
    shim = SerfShim(args.node)

    def on_event(ev: MemberEvent) -> None:
        if ev.kind == "user":
            shim.observe(ev.payload)
            return
        _emit(
            {"event": _EVENT_NAMES[ev.kind], "node": ev.name, "addr": _fmt_addr(ev.addr)},
            sys.stdout,
        )

    node = GossipNode(
        args.node,
        bind,
        advertise=advertise,
        config=config,
        keyring=keyring,
        meta=SERF_TAGS_EMPTY,
        on_event=on_event,
    )

    def metrics() -> dict[str, int]:
        return {**node.metrics(), **shim.counters}

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGUSR1, lambda: _emit({"metrics": metrics()}, sys.stderr))
    try:
        await node.start()
        if joins:
            joined = await node.join(joins)
            if joined == 0:
                # serf exits here; we stay up so a failed join can be inspected (metrics)
                # and so the other side may still join us.
                _emit(
                    {"warning": "join failed", "addrs": [_fmt_addr(a) for a in joins]}, sys.stderr
                )
            else:
                node.broadcast_user(shim.join_intent())
        await stop.wait()
        await _leave(node, shim)
    finally:
        await node.close()
        _emit({"metrics": metrics()}, sys.stderr)
    return 0


async def _leave(node: GossipNode, shim: SerfShim) -> None:
    """Serf's order (serf.go Leave): leave intent, wait until it went out, memberlist leave,
    then keep answering probes for the propagate delay."""
    assert node.core is not None
    others = [m for m in node.members() if m.name != node.name]
    if others:
        node.broadcast_user(shim.leave_intent())
        loop = asyncio.get_running_loop()
        deadline = loop.time() + INTENT_DRAIN_TIMEOUT_S
        while len(node.core.user_broadcasts) and loop.time() < deadline:
            await asyncio.sleep(0.05)
    await node.leave(propagate_s=1.0 if others else 0.0)


def cmd_agent(args: argparse.Namespace) -> int:
    try:
        import uvloop

        return uvloop.run(run_agent(args))
    except ImportError:  # pragma: no cover - uvloop is a hard dependency
        return asyncio.run(run_agent(args))


def register(subparsers: Any) -> None:
    """Add ``gossip agent`` to a CLI's subparsers (called from swarmnet/cli.py)."""
    g = subparsers.add_parser("gossip", help="the gossip (membership) layer")
    gs = g.add_subparsers(dest="gossip_cmd", required=True)
    a = gs.add_parser(
        "agent",
        help="run the membership layer alone, like `serf agent`; events as JSON lines",
    )
    a.add_argument("--node", required=True, help="node name (unique in the cluster)")
    a.add_argument("--bind", required=True, help="IP[:PORT] for UDP and TCP (port 7946)")
    a.add_argument("--advertise", help="IP[:PORT] others should use (default: --bind)")
    a.add_argument(
        "--join",
        action="append",
        default=[],
        metavar="IP:PORT",
        help="join the member at this address (repeatable)",
    )
    a.add_argument("--encrypt", help="base64 key of 16, 24 or 32 bytes (serf -encrypt)")
    a.add_argument(
        "--profile",
        choices=("lan", "wan", "local"),
        default="lan",
        help="memberlist timing profile (default lan, as serf)",
    )
    a.set_defaults(func=cmd_agent)


def main(argv: list[str] | None = None) -> int:
    """Standalone entry: ``python -m swarmnet.gossip agent ...`` (``gossip agent`` works too)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] != ["gossip"]:
        argv = ["gossip", *argv]
    parser = argparse.ArgumentParser(prog="swarmnet")
    register(parser.add_subparsers(dest="cmd", required=True))
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except ValueError as exc:  # a bad address: argparse-like exit
        print(f"error: {exc}", file=sys.stderr)
        return 2
