"""The embedded resolver's name table and its lookup rules. PURE: no I/O, no clock, no
randomness; built from plain data, so the worker (or a test) constructs it from an
assignment and the server swaps it in atomically.

Names (Docker's, from libnetwork's service records; see SWARM-INTERNALS "Service discovery"):

- ``SERVICE``            vip mode: the service's VIP on a network the asker shares with it;
                         dnsrr mode: the IPs of all its tasks on that network.
- ``tasks.SERVICE``      the IPs of all the service's tasks on that network (both modes).
- ``SERVICE.SLOT`` and ``SERVICE.SLOT.TASKID``   one task's IP (Docker registers the task
                         name ``web.1`` and the full container name ``web.1.<taskid>``).

Matching is case-insensitive (RFC 4343) and a trailing dot is optional.

Scoping: an answer only ever contains addresses on a network the asking sandbox is
attached to. The asker's networks are ordered (its first attachment first, like Docker's
endpoint order); the first of them on which the name exists gives the whole answer, so a
task that shares two networks with the asker is not returned twice.

Outcomes, and where we differ from Docker (each choice says why):

- A name in scope with addresses: NOERROR with the A records (sorted; the server shuffles).
- A name in scope with NO address (a dnsrr service with 0 running tasks, or a vip service
  whose VIP is not allocated yet): NOERROR with no answers. Docker has no record and
  forwards, so the client gets the upstream's NXDOMAIN; NODATA without an SOA is not
  cached by clients (RFC 2308), so the name works the moment a task appears (pain point
  "VIP does not resolve while a service has 0 running tasks", #37623, is avoided: a vip
  service's name is registered from its VIP, not from its backends).
- AAAA, or any other type, for a name in scope: NOERROR with no answers (swarmnet overlays
  are IPv4 only). Not NXDOMAIN: an NXDOMAIN for AAAA makes resolvers such as glibc's and
  musl's give up on the name, even though the A query succeeds (Docker does the same).
- A name swarmnet knows only on networks the asker does NOT share: NXDOMAIN. Docker
  forwards it to the upstream resolvers (its sandbox lookup only walks the sandbox's own
  networks), which leaks internal names, costs a round trip and, when the upstream is
  unreachable, hangs the client; the upstream's answer is NXDOMAIN anyway for a single
  label like ``web``. We answer NXDOMAIN at once, without an SOA, so it is not cached.
- Any other name: FORWARD (to the host's resolvers), as Docker does.

TTLs: Docker uses 600 s for every answer. A VIP lives as long as its service, so 600 s is
kept for it; task addresses change with every reschedule, and a client that honours the
TTL (nginx, the JVM, systemd-resolved) would keep a dead task's IP for 10 minutes (pain
point "stale DNS entries"), so task answers (``tasks.X``, dnsrr, task names) get 5 s.
"""

from __future__ import annotations

import enum
import ipaddress
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

VIP_TTL_S = 600  # like Docker's respTTL: a VIP is stable for the life of the service
TASK_TTL_S = 5  # task IPs move on every reschedule: keep client caches short

QTYPE_A = 1  # RFC 1035 TYPE values; only A is answered with data
QTYPE_AAAA = 28

NAME_BYTES_MAX = 255  # RFC 1035 2.3.4: longer names cannot exist, so they are not ours


class EndpointMode(enum.StrEnum):
    VIP = "vip"
    DNSRR = "dnsrr"


class Rcode(enum.StrEnum):
    """What the server must do with the query."""

    NOERROR = "noerror"  # answer locally, with ``a_records`` (possibly none: NODATA)
    NXDOMAIN = "nxdomain"  # answer locally: no such name for this asker
    FORWARD = "forward"  # not a swarmnet name: ask the upstream resolvers


@dataclass(frozen=True)
class Answer:
    rcode: Rcode
    a_records: tuple[str, ...] = ()
    ttl: int = 0


@dataclass(frozen=True)
class ServiceRecord:
    """A service. ``networks`` are the network ids it is attached to; ``vips`` maps a
    network id to the service's VIP there (vip mode; absent while not allocated)."""

    name: str
    endpoint_mode: EndpointMode = EndpointMode.VIP
    networks: tuple[str, ...] = ()
    vips: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class TaskRecord:
    """A task that should be reachable (the caller leaves out tasks that are not running).
    ``name`` is ``<service>.<slot>``; ``ips`` maps a network id to the task's address there
    (a bare IP or a CIDR as IPAM hands it out)."""

    id: str
    name: str
    service: str
    ips: Mapping[str, str] = field(default_factory=dict)


# One name on one network: its addresses and the TTL of an answer.
@dataclass(frozen=True)
class _Entry:
    ips: tuple[str, ...]
    ttl: int


def _norm(name: str) -> str:
    return name.lower().removesuffix(".")


def _ip(value: str) -> str:
    """A bare IPv4 address from ``10.0.1.5`` or ``10.0.1.5/24``; ValueError otherwise."""
    addr = ipaddress.ip_interface(value).ip
    if addr.version != 4:
        raise ValueError(f"not an IPv4 address: {value!r}")
    return str(addr)


class Records:
    """An immutable name table: ``name -> network id -> _Entry``. Build once per assignment
    and hand to the server; lookups never mutate it, so swapping the reference is atomic."""

    def __init__(self, services: Iterable[ServiceRecord] = (), tasks: Iterable[TaskRecord] = ()):
        services = list(services)
        tasks = list(tasks)
        table: dict[str, dict[str, _Entry]] = {}
        by_service: dict[str, list[TaskRecord]] = {}
        for t in tasks:
            by_service.setdefault(_norm(t.service), []).append(t)

        def task_ips(svc: str, net: str) -> tuple[str, ...]:
            ips = {_ip(t.ips[net]) for t in by_service.get(svc, ()) if net in t.ips}
            return tuple(sorted(ips, key=ipaddress.IPv4Address))

        def put(name: str, net: str, entry: _Entry) -> None:
            # First writer wins, in the order services, tasks.X, task names: a collision
            # (only possible with odd names) resolves the same way every time.
            table.setdefault(_norm(name), {}).setdefault(net, entry)

        for s in services:
            key = _norm(s.name)
            mode = EndpointMode(s.endpoint_mode)
            nets = list(dict.fromkeys([*s.networks, *s.vips]))
            for net in nets:
                if mode is EndpointMode.VIP:
                    vip = s.vips.get(net)
                    put(s.name, net, _Entry((_ip(vip),) if vip else (), VIP_TTL_S))
                else:
                    put(s.name, net, _Entry(task_ips(key, net), TASK_TTL_S))
        for s in services:
            key = _norm(s.name)
            for net in dict.fromkeys([*s.networks, *s.vips]):
                put(f"tasks.{s.name}", net, _Entry(task_ips(key, net), TASK_TTL_S))
        # Tasks of a service not (or no longer) in ``services`` still get tasks.X: the
        # records of one assignment can lag each other, and a reachable task is better
        # than an NXDOMAIN.
        for svc, members in by_service.items():
            for net in {n for t in members for n in t.ips}:
                put(f"tasks.{svc}", net, _Entry(task_ips(svc, net), TASK_TTL_S))
        for t in tasks:
            for net, ip in t.ips.items():
                entry = _Entry((_ip(ip),), TASK_TTL_S)
                put(t.name, net, entry)
                put(f"{t.name}.{t.id}", net, entry)
        self._table = table

    def __len__(self) -> int:
        return len(self._table)

    def names(self) -> list[str]:
        return sorted(self._table)

    def resolve(self, qname: str, qtype: int, asker_networks: Sequence[str]) -> Answer:
        return resolve(self, qname, qtype, asker_networks)


def resolve(records: Records, qname: str, qtype: int, asker_networks: Sequence[str]) -> Answer:
    """Docker's lookup rules (module docstring) for one question from a sandbox attached to
    ``asker_networks`` (ordered, first attachment first). Never raises."""
    if not isinstance(qname, str) or len(qname) > NAME_BYTES_MAX:
        return Answer(Rcode.FORWARD)
    per_net = records._table.get(_norm(qname))
    if per_net is None:
        return Answer(Rcode.FORWARD)
    found: _Entry | None = None
    for net in asker_networks:
        entry = per_net.get(net)
        if entry is None:
            continue
        if entry.ips:
            found = entry
            break
        found = found or entry  # in scope but empty: NODATA unless a later network has IPs
    if found is None:
        return Answer(Rcode.NXDOMAIN)
    if qtype != QTYPE_A:
        return Answer(Rcode.NOERROR, (), found.ttl)
    return Answer(Rcode.NOERROR, found.ips, found.ttl)


def records_from_assignment(services: Iterable[Mapping], tasks: Iterable[Mapping]) -> Records:
    """Build Records from plain dicts, the shape the worker has:

    services: ``{"name", "endpoint_mode" ("vip"|"dnsrr"), "networks": [net_id...],
    "vips": {net_id: "10.0.1.2/24"}}``; tasks: ``{"id", "name", "service_name",
    "networks": [{"network_id", "address"}]}`` (only the tasks that should resolve)."""
    return Records(
        services=[
            ServiceRecord(
                name=s["name"],
                endpoint_mode=EndpointMode(s.get("endpoint_mode") or "vip"),
                networks=tuple(s.get("networks") or ()),
                vips=dict(s.get("vips") or {}),
            )
            for s in services
        ],
        tasks=[
            TaskRecord(
                id=t["id"],
                name=t["name"],
                service=t["service_name"],
                ips={a["network_id"]: a["address"] for a in t.get("networks") or ()},
            )
            for t in tasks
        ],
    )
