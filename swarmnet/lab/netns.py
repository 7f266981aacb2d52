"""The netns lab: N "hosts" as network namespaces on a private underlay, one agent each.

Layout, derived from the lab name alone so that leftovers of a crashed lab can be found and
removed without any state file:

- ``snlab-<LAB>-ul``: the underlay namespace, with bridge ``br0``;
- ``snlab-<LAB>-h<i>``: host i, linked to the bridge by a veth pair (``h<i>`` in the underlay,
  ``eth0`` in the host, address ``<cidr base> + 10 + i``);
- ``snlab-<LAB>-h<i>-...``: task sandboxes that host i's agent creates (``--netns-prefix``);
- every process of host i (its agent and the tasks it starts, which inherit the environment)
  carries ``SWARMNET_LAB_ID=<LAB>/h<i>``;
- ``/run/swarmnet/lab/<LAB>/``: ``lab.json`` (a record for ``status``) and per host ``h<i>/``
  with ``data/``, ``agent.log`` and ``api.sock``.

Lab names may not contain ``-``: the namespace prefix ``snlab-<LAB>-`` must never match
another lab's namespaces (lab ``a`` would otherwise delete lab ``a-b``'s on ``down``).

The lab is a tool around the agents, not part of them, so it drives the kernel with plain
``ip`` commands: a few dozen calls, where readable error messages matter more than speed.
Nothing is ever created in the root namespace, not even for a moment: each veth is created
inside the underlay namespace with its peer placed directly in the host's namespace.
"""

from __future__ import annotations

import contextlib
import fcntl
import http.client
import ipaddress
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import tomllib
from collections.abc import Callable, Collection
from dataclasses import dataclass, replace
from pathlib import Path

from swarmnet.api.client import APIError, Client

LAB_ROOT = Path("/run/swarmnet/lab")
NETNS_DIR = Path("/run/netns")
ENV_LAB_ID = "SWARMNET_LAB_ID"
BRIDGE = "br0"
SWARM_PORT = 2377
# Host i gets the (10 + i)-th address of the underlay: leaves .1-.10 free for routers or
# a second lab element, and makes h1 = .11 as in every lab figure of the design notes.
HOST_OFFSET = 10
HOSTS_MAX = 200  # .11-.210 of a /24; more would need a larger CIDR and is not needed here
# How a host's agent is started (the lab appends the per-host flags). A variable so that
# tests can run the lab against a stand-in that serves the same API.
AGENT_ARGV = [sys.executable, "-m", "swarmnet", "agent"]
_NAME_RE = re.compile(r"^[A-Za-z0-9_]{1,32}$")
# The build machine's own network lives there (DESIGN "Labs and tests"): never use it.
_FORBIDDEN_NET = ipaddress.ip_network("192.0.2.0/24")


class LabError(Exception):
    """A lab operation failed; the message is one readable sentence for the user."""


@dataclass(frozen=True)
class LabConfig:
    """What ``lab up`` builds. Defaults are the 3-host, 1-manager lab of the design notes."""

    name: str = "swarmnet"
    hosts: int = 3  # the smallest swarm that shows cross-host traffic and a failure
    managers: int = 1  # one manager: no Raft quorum to wait for; use 3 to test failover
    cidr: str = "198.51.100.0/24"  # TEST-NET-2: never routed, never the machine's own
    mtu: int = 1500  # an Ethernet underlay, so overlay MTU = 1450 as on real hosts

    def validate(self) -> None:
        check_name(self.name)
        if not 1 <= self.hosts <= HOSTS_MAX:
            raise LabError(f"hosts must be between 1 and {HOSTS_MAX}, not {self.hosts}")
        if not 1 <= self.managers <= self.hosts:
            raise LabError(
                f"managers must be between 1 and hosts ({self.hosts}), not {self.managers}"
            )
        if not 1280 <= self.mtu <= 9000:
            raise LabError(f"mtu must be between 1280 and 9000, not {self.mtu}")
        check_underlay(self.cidr, self.hosts)

    @property
    def prefixlen(self) -> int:
        return ipaddress.IPv4Network(self.cidr).prefixlen

    def host_ip(self, i: int) -> str:
        return str(ipaddress.IPv4Network(self.cidr).network_address + HOST_OFFSET + i)


def load_topology(path: str | Path, base: LabConfig | None = None) -> LabConfig:
    """Read a cluster-compose topology file (TOML) over ``base``; unknown keys are errors, so
    that a typo does not silently give the default."""
    try:
        with open(path, "rb") as f:
            doc = tomllib.load(f)
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise LabError(f"cannot read topology file {path}: {e}") from e
    cfg = base or LabConfig()
    fields: dict[str, object] = {}
    for key, value in doc.items():
        if key in ("name", "hosts", "managers"):
            fields[key] = value
        elif key == "underlay" and isinstance(value, dict):
            for k, v in value.items():
                if k not in ("cidr", "mtu"):
                    raise LabError(f"{path}: unknown key underlay.{k}")
                fields[k] = v
        else:
            raise LabError(f"{path}: unknown key {key}")
    expected = {"name": str, "hosts": int, "managers": int, "cidr": str, "mtu": int}
    for k, v in fields.items():
        if not isinstance(v, expected[k]) or isinstance(v, bool):
            raise LabError(f"{path}: {k} must be a {expected[k].__name__}, not {v!r}")
    return replace(cfg, **fields)  # type: ignore[arg-type]


def check_underlay(cidr: str, hosts: int) -> ipaddress.IPv4Network:
    """A lab underlay (netns and VM labs alike): an IPv4 network with room for ``hosts``,
    never overlapping the build machine's own network (our traffic would leave it)."""
    try:
        net = ipaddress.IPv4Network(cidr, strict=True)
    except ValueError as e:
        raise LabError(f"underlay cidr {cidr!r} is not an IPv4 network: {e}") from e
    if net.overlaps(_FORBIDDEN_NET):
        raise LabError(f"underlay cidr {cidr} overlaps 192.0.2.0/24, the machine's own")
    if HOST_OFFSET + hosts >= net.num_addresses - 1:
        raise LabError(f"underlay cidr {cidr} is too small for {hosts} hosts")
    return net


def check_name(name: str) -> None:
    if not _NAME_RE.match(name):
        raise LabError(
            f"lab name {name!r} must be 1-32 letters, digits or '_' (no '-', so that one "
            "lab's namespace prefix never matches another's)"
        )


# ---------------------------------------------------------------- names


def underlay_ns(name: str) -> str:
    return f"snlab-{name}-ul"


def host_ns(name: str, host: str) -> str:
    return f"snlab-{name}-{host}"


def ns_prefix(name: str) -> str:
    return f"snlab-{name}-"


def lab_dir(name: str) -> Path:
    return LAB_ROOT / name


def host_api(name: str, host: str) -> str:
    """The API address of a lab host's agent (for ``SWARMNET_HOST`` and ``--lab``)."""
    return f"unix://{lab_dir(name) / host / 'api.sock'}"


# ---------------------------------------------------------------- processes


def _read_environ(pid: int) -> list[bytes]:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            return f.read().split(b"\0")
    except OSError:  # gone, or a kernel thread
        return []


def _alive(pid: int) -> bool:
    """Running, not a zombie (a killed child of ours stays in /proc until reaped)."""
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)  # reap it if it is our own child
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return False
    return stat[stat.rfind(")") + 2 :].split()[0] not in ("Z", "X")


def _protected_pids() -> set[int]:
    """Ourselves and our ancestors: ``lab exec h1 -- swarmnet lab down`` must not kill the
    shell that runs it half-way."""
    pids, pid = set(), os.getpid()
    while pid > 1:
        pids.add(pid)
        try:
            with open(f"/proc/{pid}/stat") as f:
                stat = f.read()
            pid = int(stat[stat.rfind(")") + 2 :].split()[1])
        except (OSError, ValueError):
            break
    return pids


def lab_pids(
    name: str, host: str | None = None, netns_inodes: Collection[tuple[int, int]] = ()
) -> list[int]:
    """Pids of the lab's processes: those whose environment has ``SWARMNET_LAB_ID=<LAB>/<host>``
    (any host if ``host`` is None), plus any process living in one of ``netns_inodes``."""
    if host is None:
        match = lambda v: v.startswith(f"{name}/".encode())  # noqa: E731
    else:
        match = lambda v: v == f"{name}/{host}".encode()  # noqa: E731
    key = f"{ENV_LAB_ID}=".encode()
    protected = _protected_pids()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) in protected:
            continue
        pid = int(entry)
        hit = any(v.startswith(key) and match(v[len(key) :]) for v in _read_environ(pid))
        if not hit and netns_inodes:
            with contextlib.suppress(OSError):
                st = os.stat(f"/proc/{pid}/ns/net")
                hit = (st.st_dev, st.st_ino) in netns_inodes
        if hit and _alive(pid):
            found.append(pid)
    return found


def kill_and_wait(find: Callable[[], list[int]], timeout_s: float = 15.0) -> int:
    """SIGKILL everything ``find()`` returns until it returns nothing: processes a dying
    agent had just forked are found on the next pass. Returns how many were killed."""
    killed: set[int] = set()
    deadline = time.monotonic() + timeout_s
    while True:
        pids = find()
        if not pids:
            return len(killed)
        if time.monotonic() > deadline:
            raise LabError(f"processes still alive after SIGKILL: {sorted(pids)}")
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            killed.add(pid)
        time.sleep(0.05)


def _pid_of_host(name: str, host: str, recorded: int | None) -> int | None:
    """The recorded agent pid if it is still that host's process (guards against reuse)."""
    if recorded is None or not _alive(recorded):
        return None
    if f"{ENV_LAB_ID}={name}/{host}".encode() not in _read_environ(recorded):
        return None
    return recorded


# ---------------------------------------------------------------- kernel (ip commands)


def _ip(*args: str, batch: list[str] | None = None) -> None:
    cmd = ["ip", *args] + (["-batch", "-"] if batch is not None else [])
    inp = "\n".join(batch) + "\n" if batch is not None else None
    r = subprocess.run(cmd, input=inp, capture_output=True, text=True)
    if r.returncode != 0:
        raise LabError(f"{' '.join(cmd)} failed: {r.stderr.strip() or r.returncode}")


def lab_namespaces(name: str) -> list[str]:
    try:
        entries = os.listdir(NETNS_DIR)
    except FileNotFoundError:
        return []
    return sorted(e for e in entries if e.startswith(ns_prefix(name)))


def _netns_inodes(names: list[str]) -> set[tuple[int, int]]:
    out = set()
    for n in names:
        with contextlib.suppress(OSError):
            st = os.stat(NETNS_DIR / n)
            out.add((st.st_dev, st.st_ino))
    return out


def build_network(cfg: LabConfig) -> None:
    """Underlay namespace with its bridge, and one namespace per host wired to it."""
    ul = underlay_ns(cfg.name)
    hosts = [f"h{i}" for i in range(1, cfg.hosts + 1)]
    _ip(batch=[f"netns add {ul}"] + [f"netns add {host_ns(cfg.name, h)}" for h in hosts])
    ul_cmds = [
        "link set lo up",
        f"link add {BRIDGE} mtu {cfg.mtu} type bridge",
        f"link set {BRIDGE} up",
    ]
    for h in hosts:
        # Created in the underlay namespace with its peer born in the host's: no veth end
        # ever appears in the root namespace.
        ul_cmds += [
            f"link add {h} mtu {cfg.mtu} type veth peer name eth0 mtu {cfg.mtu} "
            f"netns {host_ns(cfg.name, h)}",
            f"link set {h} master {BRIDGE} up",
        ]
    _ip("-n", ul, batch=ul_cmds)
    for i, h in enumerate(hosts, 1):
        _ip(
            "-n",
            host_ns(cfg.name, h),
            batch=[
                "link set lo up",
                f"addr add {cfg.host_ip(i)}/{cfg.prefixlen} dev eth0",
                "link set eth0 up",
            ],
        )


def set_host_link(name: str, host: str, up: bool) -> None:
    _ip("-n", underlay_ns(name), "link", "set", host, "up" if up else "down")


# ---------------------------------------------------------------- lab.json


def _record_path(name: str) -> Path:
    return lab_dir(name) / "lab.json"


def read_record(name: str) -> dict:
    check_name(name)
    try:
        return json.loads(_record_path(name).read_text())
    except FileNotFoundError:
        if lab_namespaces(name) or lab_dir(name).exists():
            raise LabError(
                f"lab {name!r} has leftovers but no lab.json: `swarmnet lab down --name {name}` "
                "removes them"
            ) from None
        raise LabError(f"no lab named {name!r}") from None
    except ValueError as e:
        raise LabError(f"lab {name!r}: lab.json is unreadable ({e})") from e


def _write_record(name: str, record: dict) -> None:
    path = _record_path(name)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(tmp, path)


@contextlib.contextmanager
def _locked(name: str):
    """Serialises read-modify-write of lab.json (``stop h1 & stop h2`` from two shells)."""
    with open(lab_dir(name) / "lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def _set_pid(name: str, host: str, pid: int | None) -> None:
    with _locked(name):
        record = read_record(name)
        for h in record["hosts"]:
            if h["host"] == host:
                h["pid"] = pid
        _write_record(name, record)


def _host_entry(record: dict, host: str) -> dict:
    for h in record["hosts"]:
        if h["host"] == host:
            return h
    raise LabError(
        f"lab {record['name']!r} has no host {host!r} (hosts: h1..h{len(record['hosts'])})"
    )


# ---------------------------------------------------------------- agents


def start_agent(name: str, host: str, ip: str) -> subprocess.Popen:
    """Start host's agent inside its namespace. ``nsenter --net`` rather than ``ip netns
    exec``: the latter makes a private mount namespace, and the agent's own ``ip netns add``
    for task sandboxes must stay visible to everyone."""
    hdir = lab_dir(name) / host
    (hdir / "data").mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        (hdir / "api.sock").unlink()  # a stale socket would make the ping wait meaningless
    cmd = [
        "nsenter",
        f"--net={NETNS_DIR / host_ns(name, host)}",
        "--",
        *AGENT_ARGV,
        "--data-dir",
        str(hdir / "data"),
        "--advertise-addr",
        ip,
        "--api",
        host_api(name, host),
        "--hostname",
        host,
        "--netns-prefix",
        f"{host_ns(name, host)}-",
    ]
    env = dict(os.environ, **{ENV_LAB_ID: f"{name}/{host}"})
    with open(hdir / "agent.log", "ab") as log:
        log.write(f"--- {time.strftime('%F %T')} lab: {' '.join(cmd)}\n".encode())
        log.flush()
        # nsenter execs the agent in place (no --fork), so this pid is the agent's.
        return subprocess.Popen(
            cmd, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True
        )


def _log_tail(name: str, host: str, lines: int = 20) -> str:
    try:
        text = (lab_dir(name) / host / "agent.log").read_text(errors="replace")
    except OSError:
        return "(no agent.log)"
    return "\n".join(text.splitlines()[-lines:])


def wait_ready(name: str, host: str, proc: subprocess.Popen, timeout_s: float = 30.0) -> None:
    """Poll ``GET /_ping`` until it answers; fail early, with the log, if the agent dies."""
    client = Client(host=host_api(name, host), timeout_s=2.0)
    deadline = time.monotonic() + timeout_s
    while True:
        if proc.poll() is not None:
            raise LabError(
                f"agent of {host} exited with status {proc.returncode}; "
                f"end of its agent.log:\n{_log_tail(name, host)}"
            )
        try:
            client.get("/_ping")
            return
        except (APIError, OSError, http.client.HTTPException):
            pass  # not listening yet, or half-started
        if time.monotonic() > deadline:
            raise LabError(
                f"agent of {host} did not answer /_ping within {timeout_s:.0f} s; "
                f"end of its agent.log:\n{_log_tail(name, host)}"
            )
        time.sleep(0.1)


def form_swarm(record: dict) -> None:
    """h1 inits; h2..hM join as managers, one at a time (Raft membership changes are one at
    a time anyway), then the rest join as workers."""
    name, hosts = record["name"], record["hosts"]
    first = hosts[0]
    c1 = Client(host=first["api"])
    ip1 = first["underlay_ip"]
    try:
        c1.post("/swarm/init", {"AdvertiseAddr": ip1, "ListenAddr": f"{ip1}:{SWARM_PORT}"})
        tokens = c1.get("/swarm")["JoinTokens"]
    except (APIError, OSError, http.client.HTTPException, KeyError, TypeError) as e:
        raise LabError(f"swarm init on {first['host']} of lab {name!r} failed: {e!r}") from e
    for h in hosts[1:]:
        token = tokens["Manager"] if h["role"] == "manager" else tokens["Worker"]
        try:
            Client(host=h["api"]).post(
                "/swarm/join",
                {
                    "RemoteAddrs": [f"{ip1}:{SWARM_PORT}"],
                    "JoinToken": token,
                    "AdvertiseAddr": h["underlay_ip"],
                    "ListenAddr": f"{h['underlay_ip']}:{SWARM_PORT}",
                },
            )
        except (APIError, OSError, http.client.HTTPException) as e:
            raise LabError(f"{h['host']} could not join the swarm of lab {name!r}: {e}") from e


# ---------------------------------------------------------------- commands


def _require_root() -> None:
    if os.geteuid() != 0:
        raise LabError("the netns lab needs root (network namespaces, veth, bridges)")


def up(cfg: LabConfig, agents: bool = True) -> dict:
    """Build the lab; with ``agents``, start one agent per host and form the swarm.
    A lab of the same name is removed first. On failure the lab is left for inspection."""
    cfg.validate()
    _require_root()
    name = cfg.name
    if lab_namespaces(name) or lab_dir(name).exists() or lab_pids(name):
        print(f"lab {name!r} already exists: removing its leftovers first", file=sys.stderr)
        down(name)
    d = lab_dir(name)
    d.mkdir(parents=True)
    record = {
        "name": name,
        "cidr": cfg.cidr,
        "mtu": cfg.mtu,
        "managers": cfg.managers,
        "underlay": {"netns": underlay_ns(name), "bridge": BRIDGE},
        "hosts": [
            {
                "host": f"h{i}",
                "netns": host_ns(name, f"h{i}"),
                "underlay_ip": cfg.host_ip(i),
                "api": host_api(name, f"h{i}"),
                "role": "manager" if i <= cfg.managers else "worker",
                "pid": None,
            }
            for i in range(1, cfg.hosts + 1)
        ],
    }
    for h in record["hosts"]:
        (d / h["host"] / "data").mkdir(parents=True)
    _write_record(name, record)  # first, so that status explains a half-built lab
    build_network(cfg)
    if not agents:
        return record
    # Start all agents first, then wait: start-up (Python imports) overlaps across hosts.
    procs = [(h, start_agent(name, h["host"], h["underlay_ip"])) for h in record["hosts"]]
    for h, proc in procs:
        h["pid"] = proc.pid
    _write_record(name, record)
    for h, proc in procs:
        wait_ready(name, h["host"], proc)
    form_swarm(record)
    return record


def down(name: str) -> None:
    """Remove everything of lab ``name``, with or without lab.json; idempotent."""
    check_name(name)
    _require_root()
    namespaces = lab_namespaces(name)
    inodes = _netns_inodes(namespaces)
    kill_and_wait(lambda: lab_pids(name, netns_inodes=inodes))
    errors = []
    for ns in namespaces:
        r = subprocess.run(["ip", "netns", "del", ns], capture_output=True, text=True)
        if r.returncode != 0 and (NETNS_DIR / ns).exists():
            errors.append(f"ip netns del {ns}: {r.stderr.strip()}")
    shutil.rmtree(lab_dir(name), ignore_errors=True)
    if lab_dir(name).exists():
        errors.append(f"could not remove {lab_dir(name)}")
    if errors:
        raise LabError("lab down left something behind: " + "; ".join(errors))


def status(name: str) -> dict:
    """The status document: lab.json with each pid checked live (null if not running)."""
    record = read_record(name)
    return {
        "name": record["name"],
        "underlay": dict(record["underlay"]),
        "hosts": [
            {
                "host": h["host"],
                "netns": h["netns"],
                "underlay_ip": h["underlay_ip"],
                "api": h["api"],
                "role": h["role"],
                "pid": _pid_of_host(name, h["host"], h["pid"]),
            }
            for h in record["hosts"]
        ],
    }


def exec_argv(name: str, host: str, argv: list[str]) -> tuple[list[str], dict[str, str]]:
    """The command line and environment that run ``argv`` on ``host``."""
    if not argv:
        raise LabError("lab exec needs a command: swarmnet lab exec HOST -- CMD...")
    entry = _host_entry(read_record(name), host)
    if not (NETNS_DIR / entry["netns"]).exists():
        raise LabError(f"namespace {entry['netns']} is missing: the lab is broken, run lab up")
    # SWARMNET_LAB_ID too: a command run on a host belongs to it, and dies with it on stop.
    env = dict(os.environ, SWARMNET_HOST=entry["api"], **{ENV_LAB_ID: f"{name}/{host}"})
    return ["nsenter", f"--net={NETNS_DIR / entry['netns']}", "--", *argv], env


def exec_on(name: str, host: str, argv: list[str]) -> int:
    cmd, env = exec_argv(name, host, argv)
    rc = subprocess.run(cmd, env=env).returncode
    return 128 - rc if rc < 0 else rc  # killed by a signal: the shell's convention


def stop(name: str, host: str) -> int:
    """A host that dies: SIGKILL its agent and every process it started, link down.
    Returns the number of processes killed."""
    _require_root()
    _host_entry(read_record(name), host)
    killed = kill_and_wait(lambda: lab_pids(name, host))
    set_host_link(name, host, up=False)
    _set_pid(name, host, None)
    return killed


def start(name: str, host: str) -> int:
    """Link up, agent restarted on its data dir (it rejoins from there by itself).
    Returns the agent's pid."""
    _require_root()
    entry = _host_entry(read_record(name), host)
    set_host_link(name, host, up=True)
    running = _pid_of_host(name, host, entry["pid"])
    if running is not None:
        return running
    proc = start_agent(name, host, entry["underlay_ip"])
    _set_pid(name, host, proc.pid)
    wait_ready(name, host, proc)
    return proc.pid
