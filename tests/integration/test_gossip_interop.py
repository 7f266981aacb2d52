"""Our ``gossip agent`` against Debian's real ``serf`` agent (serf 0.9.4, memberlist 0.2.2),
both as processes on loopback (issue 5, "Interop tests"): joins both ways, failure detection
both ways after SIGKILL, graceful leave both ways, the same key joins and a different key
never does, and serf's user events and queries reach us and are ignored safely.

No namespaces or root are needed beyond installing serf: every agent binds 127.0.0.1 on free
ports, and every process a test starts is killed in ``finally`` (the ``procs`` fixture).
Timings are printed (``pytest -s``) for the report; assertions only poll with generous
timeouts, they never assert a duration.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator

import pytest

pytestmark = pytest.mark.serf

LOOPBACK = "127.0.0.1"
STARTUP_S = 20.0
JOIN_S = 20.0
DETECT_S = 60.0  # serf LAN: about 5.5 s from SIGKILL to failed; generous for slow CI
NEGATIVE_WAIT_S = 8.0  # how long a wrongly keyed pair gets to (not) join
KEY = base64.b64encode(bytes(range(32))).decode()
OTHER_KEY = base64.b64encode(bytes(range(100, 132))).decode()


def _ensure_serf() -> str:
    path = shutil.which("serf")
    if path:
        return path
    if os.geteuid() != 0:
        pytest.skip("serf is not installed and we are not root to install it")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    res = subprocess.run(["apt-get", "install", "-y", "serf"], env=env, capture_output=True)
    if res.returncode != 0:
        subprocess.run(["apt-get", "update"], env=env, capture_output=True)
        res = subprocess.run(["apt-get", "install", "-y", "serf"], env=env, capture_output=True)
    path = shutil.which("serf")
    if res.returncode != 0 or not path:
        pytest.skip("could not install the serf package: " + res.stderr.decode()[-300:])
    return path


def _free_port() -> int:
    """A port free for both TCP and UDP (gossip binds both on the same number)."""
    for _ in range(100):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as t:
            t.bind((LOOPBACK, 0))
            port = t.getsockname()[1]
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
                try:
                    u.bind((LOOPBACK, port))
                except OSError:
                    continue
            return port
    raise RuntimeError("no free port")


def poll(cond: Callable[[], bool], what: str, timeout_s: float) -> float:
    """Wait until ``cond()``; returns the seconds it took (for the printed timings)."""
    start = time.monotonic()
    while not cond():
        if time.monotonic() - start > timeout_s:
            raise AssertionError(f"timed out after {timeout_s} s waiting for: {what}")
        time.sleep(0.05)
    return time.monotonic() - start


class Proc:
    """A child process whose output goes to a temp file (readable while it runs)."""

    def __init__(self, cmd: list[str], stdout_pipe: bool = False):
        self.log = tempfile.NamedTemporaryFile(prefix="gossip-interop-", delete=False)
        self.cmd = cmd
        self.proc = subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE if stdout_pipe else self.log,
            stderr=self.log,
        )

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_text(self) -> str:
        with open(self.log.name, "rb") as f:
            return f.read().decode(errors="replace")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        try:
            self.proc.wait(timeout=10)
        finally:
            self.log.close()
            os.unlink(self.log.name)


class SerfAgent(Proc):
    def __init__(self, name: str, key: str | None = None):
        self.binary = _ensure_serf()
        self.name = name
        self.port, self.rpc = _free_port(), _free_port()
        self.addr = f"{LOOPBACK}:{self.port}"
        cmd = [self.binary, "agent", "-node", name, "-bind", self.addr]
        cmd += ["-rpc-addr", f"{LOOPBACK}:{self.rpc}", "-log-level", "debug"]
        if key:
            cmd += ["-encrypt", key]
        super().__init__(cmd)
        poll(self._rpc_up, f"serf {name} RPC up", STARTUP_S)

    def _rpc_up(self) -> bool:
        assert self.alive(), "serf exited during startup:\n" + self.log_text()[-2000:]
        try:
            socket.create_connection((LOOPBACK, self.rpc), timeout=1).close()
            return True
        except OSError:
            return False

    def cli(self, *args: str) -> subprocess.CompletedProcess:
        cmd = [self.binary, args[0], "-rpc-addr", f"{LOOPBACK}:{self.rpc}", *args[1:]]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=30)

    def status(self, node: str) -> str | None:
        res = self.cli("members", "-format", "json")
        if res.returncode != 0:
            return None
        for m in json.loads(res.stdout)["members"]:
            if m["name"] == node:
                return m["status"]
        return None


class OurAgent(Proc):
    """``python -m swarmnet.gossip agent``; stdout JSON lines collected by a thread."""

    def __init__(self, name: str, *, join: list[str] = (), key: str | None = None):
        self.name = name
        self.port = _free_port()
        self.addr = f"{LOOPBACK}:{self.port}"
        cmd = [sys.executable, "-m", "swarmnet.gossip", "agent", "--node", name]
        cmd += ["--bind", self.addr]
        for j in join:
            cmd += ["--join", j]
        if key:
            cmd += ["--encrypt", key]
        super().__init__(cmd, stdout_pipe=True)
        self.events: list[dict] = []
        self._lock = threading.Lock()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        poll(lambda: self.has("member-join", name), f"our agent {name} started", STARTUP_S)

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            ev = json.loads(line)  # every stdout line must be one JSON object
            with self._lock:
                self.events.append(ev)

    def has(self, event: str, node: str) -> bool:
        assert self.alive() or self.proc.returncode == 0, self.log_text()[-2000:]
        with self._lock:
            return any(e["event"] == event and e["node"] == node for e in self.events)

    def nodes_seen(self) -> set[str]:
        with self._lock:
            return {e["node"] for e in self.events}

    def metrics(self) -> dict[str, int]:
        """Ask for a metrics line (SIGUSR1) and return it."""
        before = self._metric_lines()
        self.proc.send_signal(signal.SIGUSR1)
        poll(lambda: len(self._metric_lines()) > len(before), "metrics line", 10.0)
        return self._metric_lines()[-1]

    def _metric_lines(self) -> list[dict]:
        out = []
        for line in self.log_text().splitlines():
            if line.startswith('{"metrics"'):
                out.append(json.loads(line)["metrics"])
        return out


@pytest.fixture
def procs() -> Iterator[list[Proc]]:
    """Every process a test starts goes in here; all are killed at teardown."""
    started: list[Proc] = []
    try:
        yield started
    finally:
        for p in started:
            if p.proc.poll() is not None and p.proc.returncode not in (0, -9):
                print(f"--- {p.cmd[0]} exited {p.proc.returncode}:\n{p.log_text()[-3000:]}")
        for p in started:
            p.kill()


def _pair(procs: list[Proc], *, serf_joins: bool, key: str | None = None):
    serf = SerfAgent("s1", key)
    procs.append(serf)
    t0 = time.monotonic()
    if serf_joins:
        ours = OurAgent("py1", key=key)
        procs.append(ours)
        t0 = time.monotonic()
        res = serf.cli("join", ours.addr)
        assert res.returncode == 0, res.stdout + res.stderr
    else:
        ours = OurAgent("py1", join=[serf.addr], key=key)
        procs.append(ours)
    poll(lambda: serf.status("py1") == "alive", "serf lists py1 alive", JOIN_S)
    poll(lambda: ours.has("member-join", "s1"), "we list s1 alive", JOIN_S)
    print(
        f"timing: join ({'serf joins us' if serf_joins else 'we join serf'}, "
        f"key={bool(key)}): both sides list each other after {time.monotonic() - t0:.2f} s"
    )
    return serf, ours


def test_serf_joins_our_agent(procs) -> None:
    serf, ours = _pair(procs, serf_joins=True)
    assert serf.status("s1") == "alive"
    assert ours.alive()


def test_our_agent_joins_serf(procs) -> None:
    serf, ours = _pair(procs, serf_joins=False)
    assert ours.alive()


def test_sigkill_ours_serf_marks_failed(procs) -> None:
    serf, ours = _pair(procs, serf_joins=False)
    ours.proc.kill()
    took = poll(lambda: serf.status("py1") == "failed", "serf marks py1 failed", DETECT_S)
    print(f"timing: SIGKILL ours -> serf lists failed after {took:.2f} s")


def test_sigkill_serf_we_report_failed(procs) -> None:
    serf, ours = _pair(procs, serf_joins=True)
    serf.proc.kill()
    took = poll(lambda: ours.has("member-failed", "s1"), "we print member-failed", DETECT_S)
    print(f"timing: SIGKILL serf -> we print member-failed after {took:.2f} s")
    assert not ours.has("member-leave", "s1")
    assert ours.alive()


def test_our_graceful_leave_is_left_in_serf(procs) -> None:
    serf, ours = _pair(procs, serf_joins=False)
    ours.proc.send_signal(signal.SIGTERM)
    took = poll(lambda: serf.status("py1") == "left", "serf lists py1 left", DETECT_S)
    print(f"timing: SIGTERM ours -> serf lists left after {took:.2f} s")
    assert ours.proc.wait(timeout=30) == 0
    assert ours.has("member-leave", "py1")


def test_serf_graceful_leave_is_a_leave_for_us(procs) -> None:
    serf, ours = _pair(procs, serf_joins=True)
    res = serf.cli("leave")
    assert res.returncode == 0, res.stdout + res.stderr
    took = poll(lambda: ours.has("member-leave", "s1"), "we print member-leave", DETECT_S)
    print(f"timing: serf leave -> we print member-leave after {took:.2f} s")
    assert not ours.has("member-failed", "s1")


@pytest.mark.parametrize("serf_joins", [False, True])
def test_same_key_joins(procs, serf_joins: bool) -> None:
    serf, ours = _pair(procs, serf_joins=serf_joins, key=KEY)
    assert ours.metrics().get("drop_packet_decrypt_failed", 0) == 0


def test_different_key_never_joins(procs) -> None:
    serf = SerfAgent("s1", KEY)
    procs.append(serf)
    ours = OurAgent("py1", join=[serf.addr], key=OTHER_KEY)
    procs.append(ours)
    res = serf.cli("join", ours.addr)
    assert res.returncode != 0, "serf must not be able to join a differently keyed agent"
    poll(
        lambda: ours.metrics().get("drop_stream_decrypt_failed", 0) >= 2,
        "our decryption-failure counter rises (serf's errResp and serf's join)",
        JOIN_S,
    )
    deadline = time.monotonic() + NEGATIVE_WAIT_S
    while time.monotonic() < deadline:  # a generous wait, watching for a wrong join
        assert serf.status("py1") is None
        assert "s1" not in ours.nodes_seen()
        time.sleep(0.5)
    assert ours.alive() and serf.alive()


def test_serf_events_and_queries_are_ignored_safely(procs) -> None:
    serf, ours = _pair(procs, serf_joins=True)
    for i in range(3):
        res = serf.cli("event", "foo", f"bar{i}")
        assert res.returncode == 0, res.stderr
    res = serf.cli("query", "-timeout", "2s", "whoami", "payload")
    assert res.returncode == 0, res.stderr
    poll(
        lambda: (
            (m := ours.metrics()).get("serf_user_event", 0) >= 3 and m.get("serf_query", 0) >= 1
        ),
        "serf events and queries counted",
        JOIN_S,
    )
    # Still answering probes afterwards: serf keeps probing us (packets keep arriving) and
    # keeps listing us alive, and we are up.
    seen = ours.metrics()["packets_in"]
    poll(lambda: ours.metrics()["packets_in"] >= seen + 5, "serf keeps probing us", JOIN_S)
    assert serf.status("py1") == "alive"
    assert ours.alive()
    assert ours.metrics().get("handler_errors", 0) == 0
