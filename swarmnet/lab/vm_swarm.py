"""A swarm of real swarmnet agents inside a VM lab (swarmnet.lab.vm): one agent per guest.

Why: this machine's kernel has no ESP and no IPVS, so encrypted overlays (issue 7) and the
IPVS load balancer (issue 6) can only be tested end to end in guests running Debian's kernel.
Each guest runs the host's userland read-only (9p + tmpfs overlay), so the agent is the
project's own venv, started the way the netns lab starts it (swarmnet.lab.netns).

Inside every guest (all paths are guest-local: its /run and /var are its own RAM):

- the agent's data dir ``/var/lib/swarmnet``, its log ``/var/log/swarmnet-agent.log``;
- its API on ``unix:///run/swarmnet/api.sock``; task sandboxes ``swarmnet-t-...``.

Everything is driven through ``vm.exec_on``. Python under TCG is 15-20x slower than on the
host (one CLI call ~2-6 s, an agent start ~15-60 s), so: agents of all guests start in
parallel, the API is read with ``curl`` (no Python start-up) where a test polls, and the
``swarmnet`` CLI (``cli``) is used where the command line itself is what is being tested.
"""

from __future__ import annotations

import json
import shlex
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from swarmnet.lab import vm
from swarmnet.lab.netns import LabError

# The venv's interpreter: the same path inside the guest (the host's / is its root).
PY = str(Path(sys.prefix) / "bin" / "python")
DATA_DIR = "/var/lib/swarmnet"
API_SOCK = "/run/swarmnet/api.sock"
API = f"unix://{API_SOCK}"
AGENT_LOG = "/var/log/swarmnet-agent.log"
SWARM_PORT = 2377
# Loaded before the agent starts: the kernel would load most on demand (kernel.modprobe is
# set), but aesni_intel must be there before the first SA or the slower generic GCM is used.
MODULES = "aesni_intel esp4 xfrm_user vxlan veth bridge nf_tables nf_conntrack ip_vs ip_vs_rr"

T = TypeVar("T")

class SwarmError(LabError):
    """A swarm step in the VM lab failed; the message carries the agents' log tails."""


@dataclass(frozen=True)
class SwarmConfig:
    """What ``up`` builds. Defaults: the 3-guest, 1-manager swarm of the encryption tests."""

    hosts: int = 3
    # An agent (manager) is ~75-100 MiB RSS under the 6.1 guest kernel, the tmpfs overlay
    # takes every write, tasks and iperf3 need room: 256 MiB was measured too tight.
    memory_mib: int = 448
    agent_args: tuple[str, ...] = ()  # extra `swarmnet agent` flags, e.g. ("--lb-backend", "ipvs")
    agent_timeout_s: float = 300.0  # a cold venv import over 9p under TCG, 3 guests at once
    boot_timeout_s: float = 240.0
    # `swarm init --dispatcher-heartbeat`: the leader marks a node down after two periods
    # without a poll. Under TCG on a loaded 2-core machine a worker's long-poll arrived >10 s
    # late with the 5 s default, and the leader marked live nodes (itself included) down and
    # rescheduled their tasks every ~20 s.
    heartbeat_s: float = 30.0
    # Hosts left out of scheduling after the join (``node update --availability drain``).
    drain: tuple[str, ...] = field(default_factory=tuple)


# ---------------------------------------------------------------- in-guest helpers


def sh(lab: str, host: str, script: str, timeout_s: float = 180.0, check: bool = True) -> str:
    """Run a shell script in a guest; with ``check`` a non-zero exit is a SwarmError."""
    rc, out, err = vm.exec_on(lab, host, ["sh", "-c", script], timeout_s)
    if check and rc != 0:
        raise SwarmError(
            f"{host}: rc={rc}: {script}\n--- out\n{out[-2000:]}\n--- err\n{err[-2000:]}"
        )
    return out


def logs(lab: str, host: str, lines: int = 40) -> str:
    """The end of a guest's agent log (for failure messages); never raises."""
    try:
        rc, out, err = vm.exec_on(lab, host, ["tail", "-n", str(lines), AGENT_LOG], 30)
        return out if rc == 0 else f"(no agent log on {host}: {err.strip()})"
    except LabError as e:
        return f"(cannot read the agent log of {host}: {e})"


def all_logs(lab: str, hosts: list[str], lines: int = 25) -> str:
    return "\n".join(f"--- {h} {AGENT_LOG}\n{logs(lab, h, lines)}" for h in hosts)


def _parse(out: str) -> Any:
    """JSON if the output is one document or JSON lines (``--format json``), else the text."""
    text = out.strip()
    if not text:
        return text
    try:
        return json.loads(text)
    except ValueError:
        pass
    try:
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    except ValueError:
        return out


def cli(lab: str, host: str, *args: str, timeout_s: float = 300.0, check: bool = True) -> Any:
    """Run ``swarmnet -H <guest API> ARGS`` in the guest. Returns the parsed output (see
    ``_parse``); with ``check``, a failure raises SwarmError with the agent's log tail."""
    argv = [PY, "-m", "swarmnet", "-H", API, *args]
    rc, out, err = vm.exec_on(lab, host, argv, timeout_s)
    if check and rc != 0:
        raise SwarmError(
            f"{host}: swarmnet {' '.join(args)} -> rc={rc}\n--- out\n{out[-1500:]}\n"
            f"--- err\n{err[-1500:]}\n--- agent log\n{logs(lab, host, 20)}"
        )
    return _parse(out) if rc == 0 else (rc, out, err)


def api(
    lab: str, host: str, method: str, path: str, body: Any = None, timeout_s: float = 60.0
) -> Any:
    """One request to a guest agent's API through ``curl`` in the guest (no Python start-up:
    ~0.1 s instead of ~3 s). Returns the parsed JSON; an HTTP error is a SwarmError."""
    argv = ["curl", "-sS", "--unix-socket", API_SOCK, "-X", method, "-w", "\n%{http_code}"]
    argv += ["-m", str(int(timeout_s))]
    if body is not None:
        argv += ["-H", "Content-Type: application/json", "--data-binary", json.dumps(body)]
    argv.append(f"http://localhost{path}")
    rc, out, err = vm.exec_on(lab, host, argv, timeout_s + 10)
    text, _, code = out.rpartition("\n")
    if rc != 0 or not code.startswith("2"):
        raise SwarmError(f"{host}: {method} {path} -> rc={rc} http={code}: {text[-800:]} {err}")
    return json.loads(text) if text.strip() else None


def wait_for(
    what: str, probe: Callable[[], T | None], timeout_s: float, interval_s: float = 1.0
) -> T:
    """Poll ``probe`` until it returns something truthy; SwarmError after ``timeout_s``
    (with the last exception, if the probe raised)."""
    deadline = time.monotonic() + timeout_s
    last: Exception | None = None
    while True:
        try:
            got = probe()
            if got:
                return got
        except LabError as e:
            last = e
        if time.monotonic() > deadline:
            raise SwarmError(f"timed out after {timeout_s:.0f} s waiting for {what}; last: {last}")
        time.sleep(interval_s)


def parallel(fn: Callable[[str], T], hosts: list[str]) -> dict[str, T]:
    """``fn(host)`` for every host at once (each VM has its own channel); the first error
    is raised after all finished."""
    results: dict[str, Any] = {}

    def run(h: str) -> None:
        try:
            results[h] = fn(h)
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
            results[h] = e

    threads = [threading.Thread(target=run, args=(h,)) for h in hosts]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for h in hosts:
        if isinstance(results.get(h), BaseException):
            raise results[h]
    return results


# ---------------------------------------------------------------- agents and swarm


def host_ip(record: dict, host: str) -> str:
    for h in record["hosts"]:
        if h["host"] == host:
            return h["underlay_ip"]
    raise SwarmError(f"lab {record['name']!r} has no host {host!r}")


def start_agent(lab: str, host: str, ip: str, extra: tuple[str, ...] = ()) -> int:
    """Start the agent in the background (setsid, output to its log); returns its pid."""
    agent = [PY, "-m", "swarmnet", "agent", "--data-dir", DATA_DIR,
             "--advertise-addr", ip, "--api", API, "--hostname", host, *extra]  # fmt: skip
    return vm.spawn(
        lab, host, " ".join(shlex.quote(a) for a in agent), AGENT_LOG,
        prelude=f"modprobe -a {MODULES} 2>/dev/null; mkdir -p {DATA_DIR} /run/swarmnet",
    )  # fmt: skip


def wait_api(lab: str, host: str, pid: int, timeout_s: float) -> float:
    """Wait in the guest until the agent answers ``/_ping`` (fails at once if it died).
    Returns the seconds waited."""
    t0 = time.monotonic()
    script = (
        f"while ! curl -sf -m 5 --unix-socket {API_SOCK} http://localhost/_ping >/dev/null; do "
        f"kill -0 {pid} 2>/dev/null || {{ echo 'agent exited'; exit 3; }}; sleep 0.3; done"
    )
    rc, out, _ = vm.exec_on(lab, host, ["sh", "-c", script], timeout_s)
    if rc != 0:
        why = "exited" if rc == 3 else f"did not answer within {timeout_s:.0f} s (rc {rc})"
        raise SwarmError(f"agent of {host} {why}; end of its log:\n{logs(lab, host)}")
    return time.monotonic() - t0


def node_ids(lab: str, manager: str = "h1") -> dict[str, str]:
    """hostname -> node id, from the manager's API."""
    return {n["Description"]["Hostname"]: n["ID"] for n in api(lab, manager, "GET", "/nodes")}


def form_swarm(
    lab: str, record: dict, timings: dict[str, float], heartbeat_s: float = 30.0
) -> None:
    """``swarm init`` on h1 with the CLI, the others join as workers (in parallel)."""
    hosts = [h["host"] for h in record["hosts"]]
    ip1 = host_ip(record, "h1")
    t = time.monotonic()
    cli(lab, "h1", "swarm", "init", "--advertise-addr", ip1,
        "--dispatcher-heartbeat", str(heartbeat_s))  # fmt: skip
    token = cli(lab, "h1", "swarm", "join-token", "-q", "worker").strip()
    timings["init_s"] = time.monotonic() - t

    def join(h: str) -> None:
        cli(lab, h, "swarm", "join", "--token", token, "--advertise-addr",
            host_ip(record, h), f"{ip1}:{SWARM_PORT}")  # fmt: skip

    t = time.monotonic()
    parallel(join, hosts[1:])

    def all_ready() -> bool:
        nodes = api(lab, "h1", "GET", "/nodes")
        ready = {n["Description"]["Hostname"] for n in nodes if n["Status"]["State"] == "ready"}
        return ready >= set(hosts)

    wait_for("every node ready", all_ready, 180)
    timings["join_s"] = time.monotonic() - t


def drain(lab: str, host: str, availability: str = "drain") -> None:
    """``node update --availability`` from h1 (the scheduler skips drained nodes)."""
    cli(lab, "h1", "node", "update", "--availability", availability, host)


def up(lab: str, cfg: SwarmConfig | None = None) -> dict:
    """Boot the guests, start one agent in each (at once), form the swarm. Returns the lab
    record with ``api``/``role``/``agent_pid`` filled in and ``timings`` (seconds). On
    failure the lab is left for the caller's ``down`` (the error has the logs)."""
    cfg = cfg or SwarmConfig()
    timings: dict[str, float] = {}
    t = time.monotonic()
    record = vm.up(lab, cfg.hosts, vm.VmConfig(memory_mib=cfg.memory_mib,
                                               boot_timeout_s=cfg.boot_timeout_s))  # fmt: skip
    timings["boot_s"] = time.monotonic() - t
    hosts = [h["host"] for h in record["hosts"]]
    t = time.monotonic()
    pids = {
        h["host"]: start_agent(lab, h["host"], h["underlay_ip"], cfg.agent_args)
        for h in record["hosts"]
    }
    waited = parallel(lambda h: wait_api(lab, h, pids[h], cfg.agent_timeout_s), hosts)
    timings["agents_s"] = time.monotonic() - t
    timings.update({f"agent_{h}_s": round(s, 1) for h, s in waited.items()})
    form_swarm(lab, record, timings, cfg.heartbeat_s)
    for h in cfg.drain:
        drain(lab, h)
    for h in record["hosts"]:
        h["api"] = API  # a guest path: use cli()/api() (exec_on), not the host
        h["role"] = "manager" if h["host"] == "h1" else "worker"
        h["agent_pid"] = pids[h["host"]]
    record["timings"] = {k: round(v, 1) for k, v in timings.items()}
    vm.write_record(lab, record)
    return record


def down(lab: str) -> None:
    vm.down(lab)


# ---------------------------------------------------------------- tasks


def tasks(lab: str, service: str, manager: str = "h1") -> list[dict]:
    """Running tasks of ``service``: ``{"id", "name", "host", "state", "addrs": {net: ip}}``."""
    nodes = {v: k for k, v in node_ids(lab, manager).items()}
    svc = api(lab, manager, "GET", f"/services/{service}")
    flt = json.dumps({"service": {svc["ID"]: True}})
    out = []
    for t in api(lab, manager, "GET", "/tasks?filters=" + _urlquote(flt)):
        if t["DesiredState"] != "running":
            continue
        addrs = {
            na["Network"]["Spec"]["Name"]: na["Addresses"][0].split("/")[0]
            for na in t.get("NetworksAttachments", []) if na.get("Addresses")
        }  # fmt: skip
        out.append({"id": t["ID"], "name": t.get("Name") or f"{service}.{t['Slot']}",
                    "host": nodes.get(t["NodeID"], t["NodeID"]),
                    "state": t["Status"]["State"], "err": t["Status"]["Err"], "addrs": addrs})  # fmt: skip
    return sorted(out, key=lambda t: t["name"])


def _urlquote(s: str) -> str:
    from urllib.parse import quote

    return quote(s, safe="")


def wait_running(lab: str, service: str, replicas: int, timeout_s: float = 240.0) -> list[dict]:
    """Wait until ``replicas`` tasks of ``service`` run; the error lists task errors."""
    last: list[dict] = []

    def probe() -> list[dict] | None:
        nonlocal last
        last = tasks(lab, service)
        running = [t for t in last if t["state"] == "running"]
        return running if len(running) == replicas and len(last) == replicas else None

    try:
        return wait_for(f"{replicas} running tasks of {service}", probe, timeout_s)
    except SwarmError as e:
        raise SwarmError(f"{e}\ntasks: {last}") from None


def task_pid(lab: str, host: str, task: str) -> int:
    """The pid of a task running on ``host`` (name, id or id prefix)."""
    for t in api(lab, host, "GET", "/swarmnet/local-tasks"):
        if task in (t["name"], t["id"]) or t["id"].startswith(task):
            if t.get("pid"):
                return int(t["pid"])
    raise SwarmError(f"no running task {task!r} on {host}")


def in_task(
    lab: str, host: str, task: str, script: str, timeout_s: float = 180.0, check: bool = True
) -> tuple[int, str, str]:
    """Run a shell script inside a task's sandbox (its net, UTS and mount namespaces) with
    nsenter, as ``swarmnet exec`` does but without the CLI's Python start-up."""
    pid = task_pid(lab, host, task)
    argv = ["nsenter", "-t", str(pid), "-n", "-u", "-m", "--", "sh", "-c", script]
    rc, out, err = vm.exec_on(lab, host, argv, timeout_s)
    if check and rc != 0:
        raise SwarmError(f"{host}/{task}: rc={rc}: {script}\n{out[-1500:]}\n{err[-1500:]}")
    return rc, out, err


def spawn_in_task(lab: str, host: str, task: str, script: str, log: str) -> int:
    """Start ``script`` in a task's sandbox in the background; output to ``log`` (a guest
    path). Returns the pid of the backgrounded shell (``stop`` it later)."""
    pid = task_pid(lab, host, task)
    return vm.spawn(lab, host, f"nsenter -t {pid} -n -u -m -- sh -c {shlex.quote(script)}", log)


# ---------------------------------------------------------------- XFRM in a guest


def xfrm_states(lab: str, host: str) -> set[tuple[str, str, int]]:
    """ESP SAs of a guest: {(src, dst, spi)}, parsed from ``ip xfrm state``."""
    out = sh(lab, host, "ip xfrm state", 60)
    found, src, dst = set(), None, None
    for line in out.splitlines():
        parts = line.split()
        if line.startswith("src ") and len(parts) >= 4:
            src, dst = parts[1], parts[3]
        elif parts[:2] == ["proto", "esp"] and "spi" in parts and src and dst:
            found.add((src, dst, int(parts[parts.index("spi") + 1], 16)))
    return found


def xfrm_policy_peers(lab: str, host: str) -> set[str]:
    """Addresses named in a guest's XFRM policies (selectors and templates)."""
    out = sh(lab, host, "ip xfrm policy", 60)
    peers = set()
    for line in out.splitlines():
        parts = line.split()
        for key in ("src", "dst"):
            if key in parts:
                addr = parts[parts.index(key) + 1].split("/")[0]
                if addr not in ("0.0.0.0", "::"):
                    peers.add(addr)
    return peers
