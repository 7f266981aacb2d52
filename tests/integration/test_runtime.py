"""The task runtime against the real kernel: sandboxes (netns + UTS + mount namespaces),
restart on crash, adoption by a new Supervisor, stop with SIGTERM/SIGKILL, exec.

Each test makes its own `sntest-*` network namespace (the overlay reconciler's job in the
agent) and removes it, and kills every process group it saw, even on failure."""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from swarmnet.runtime import RuntimeConfig, Supervisor, TaskSpec, exec_argv
from swarmnet.runtime.supervisor import STATE_FILE, group_members

pytestmark = [
    pytest.mark.kernel,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespaces)"),
    pytest.mark.skipif(shutil.which("ip") is None, reason="needs iproute2"),
]

TIMEOUT_S = 20.0  # generous: polling stops as soon as the condition holds


async def wait_for(cond: Callable[[], object], what: str, timeout_s: float = TIMEOUT_S):
    deadline = time.monotonic() + timeout_s
    while True:
        v = cond()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


@pytest.fixture
def netns():
    name = "sntest-" + secrets.token_hex(4)
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


class Harness:
    """Makes Supervisors on one state dir, records every status, and cleans up."""

    def __init__(self, state_dir: Path, netns: str, config: RuntimeConfig):
        self.state_dir = state_dir
        self.netns = netns
        self.config = config
        self.events: list[tuple[str, str, str, int | None]] = []
        self.pids: set[int] = set()
        self.sups: list[Supervisor] = []

    def on_status(self, tid: str, state: str, error: str, pid: int | None) -> None:
        self.events.append((tid, state, error, pid))
        if pid is not None:
            self.pids.add(pid)

    async def supervisor(self) -> Supervisor:
        sup = Supervisor(self.state_dir, self.on_status, config=self.config)
        self.sups.append(sup)
        await sup.start()
        return sup

    def spec(self, argv: tuple[str, ...], task_id: str = "t1", name: str = "web.1", **kw):
        env = (
            ("SWARMNET_SERVICE_NAME", name.split(".")[0]),
            ("SWARMNET_TASK_NAME", name),
            ("SWARMNET_TASK_ID", task_id),
            ("SWARMNET_NODE_ID", "node1"),
        )
        return TaskSpec(task_id=task_id, name=name, netns=self.netns, argv=argv, env=env, **kw)

    def states(self, tid: str = "t1") -> list[str]:
        return [s for t, s, _, _ in self.events if t == tid]

    async def cleanup(self) -> None:
        for sup in self.sups:
            with contextlib.suppress(Exception):
                await sup.close()
        for pid in self.pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)


@pytest.fixture
async def harness(tmp_path, netns):
    resolv = tmp_path / "host-resolv.conf"
    resolv.write_text("nameserver 127.0.0.11\noptions ndots:0 # sntest-marker\n")
    cfg = RuntimeConfig(restart_delay_s=0.1, restart_delay_max_s=0.5, resolv_conf_source=resolv)
    h = Harness(tmp_path / "state", netns, cfg)
    try:
        yield h
    finally:
        await h.cleanup()


def read_log(h: Harness, tid: str = "t1") -> str:
    try:
        return (h.state_dir / tid / "output.log").read_text()
    except FileNotFoundError:
        return ""


SANDBOX_CMD = (
    "sh",
    "-c",
    "hostname; cat /etc/resolv.conf; ip -o link; echo TASK=$SWARMNET_TASK_NAME;"
    " echo LAB=$SWARMNET_LAB_ID; cat /etc/hosts; echo READY; exec sleep 1000",
)


async def test_sandbox_hostname_resolv_netns_and_exec(harness, monkeypatch):
    monkeypatch.setenv("SWARMNET_LAB_ID", "sntest-lab")
    host_name = socket.gethostname()
    sup = await harness.supervisor()
    sup.ensure(harness.spec(SANDBOX_CMD, hosts=(("10.0.1.5", "web.1"),)))
    await wait_for(lambda: "READY" in read_log(harness), "task output")
    out = read_log(harness).splitlines()
    assert out[0] == "web.1"
    assert "nameserver 127.0.0.11" in out and any("sntest-marker" in ln for ln in out)
    links = [ln for ln in out if ln[:1].isdigit() and ": " in ln and "link/" in ln]
    assert len(links) == 1 and links[0].split(": ")[1] == "lo", links
    assert "TASK=web.1" in out
    assert "LAB=sntest-lab" in out
    assert "10.0.1.5\tweb.1" in out
    assert socket.gethostname() == host_name  # the host's UTS namespace is untouched
    assert "sntest-marker" not in Path("/etc/resolv.conf").read_text()  # no mount leaked

    pid = sup.pid("t1")
    assert pid is not None and sup.tasks() == {"t1": pid}
    assert harness.states() == ["starting", "running"]
    r = subprocess.run(exec_argv(pid, ["hostname"]), capture_output=True, text=True, timeout=10)
    assert r.returncode == 0 and r.stdout.strip() == "web.1", r
    r = subprocess.run(
        exec_argv(pid, ["cat", "/etc/resolv.conf"]), capture_output=True, text=True, timeout=10
    )
    assert "sntest-marker" in r.stdout

    await sup.stop("t1")
    assert group_members(pid) == []
    assert harness.states()[-1] == "shutdown"
    assert sup.tasks() == {} and not (harness.state_dir / "t1").exists()


async def test_restart_after_sigkill(harness):
    sup = await harness.supervisor()
    sup.ensure(harness.spec(("sh", "-c", "sleep 1000")))
    pid1 = sup.pid("t1")
    assert pid1 is not None
    sup.ensure(harness.spec(("sh", "-c", "sleep 1000")))  # idempotent: no second process
    assert sup.pid("t1") == pid1 and harness.states() == ["starting", "running"]

    os.kill(pid1, signal.SIGKILL)
    pid2 = await wait_for(lambda: sup.pid("t1") not in (None, pid1) and sup.pid("t1"), "restart")
    assert pid2 != pid1
    states = harness.states()
    i = states.index("failed")
    assert "running" in states[i + 1 :]
    err = next(e for _, s, e, _ in harness.events if s == "failed")
    assert "SIGKILL" in err
    # The rest of the dead task's group (its `sleep`) was killed too, not leaked.
    await wait_for(lambda: group_members(pid1) == [], "old group gone")
    await sup.stop("t1")


async def test_adopt_after_close(harness):
    sup1 = await harness.supervisor()
    sup1.ensure(harness.spec(("sh", "-c", "sleep 1000")))
    pid = sup1.pid("t1")
    assert pid is not None
    await sup1.close()
    assert group_members(pid) != []  # close() leaves the task running

    n = len(harness.events)
    sup2 = await harness.supervisor()
    assert sup2.pid("t1") == pid
    assert harness.events[n:] == [("t1", "running", "", pid)]  # adopted, not restarted
    assert sup2.tasks() == {"t1": pid}
    sup2.ensure(harness.spec(("sh", "-c", "sleep 1000")))  # already running: nothing
    assert sup2.pid("t1") == pid and len(harness.events) == n + 1

    # An adopted process is watched like an own one: a crash restarts it.
    os.kill(pid, signal.SIGKILL)
    pid2 = await wait_for(lambda: sup2.pid("t1") not in (None, pid) and sup2.pid("t1"), "restart")
    await sup2.stop("t1")
    assert group_members(pid2) == []


async def test_adopt_rejects_recycled_pid(harness):
    """A pid in tasks.json whose start time differs is someone else: not adopted, not
    touched, reported failed."""
    sup1 = await harness.supervisor()
    sup1.ensure(harness.spec(("sh", "-c", "sleep 1000")))
    pid = sup1.pid("t1")
    assert pid is not None
    # Past the launcher (which needs the task's files that sup2 will drop): sh and sleep.
    await wait_for(lambda: len(group_members(pid)) == 2, "task running")
    await sup1.close()
    path = harness.state_dir / STATE_FILE
    path.write_text(path.read_text().replace('"start_ticks": ', '"start_ticks": 1'))

    n = len(harness.events)
    sup2 = await harness.supervisor()
    assert sup2.tasks() == {}
    assert [(t, s) for t, s, _, _ in harness.events[n:]] == [("t1", "failed")]
    assert group_members(pid) != []  # the "stranger" was left alone
    # ensure() starts it afresh.
    sup2.ensure(harness.spec(("sh", "-c", "sleep 1000")))
    assert sup2.pid("t1") not in (None, pid)
    await sup2.stop("t1")


async def test_stop_sigterm_then_sigkill(harness):
    sup = await harness.supervisor()
    sup.ensure(harness.spec(("sh", "-c", "sleep 1000 & wait"), task_id="polite"))
    sup.ensure(harness.spec(("sh", "-c", 'trap "" TERM; sleep 1000'), task_id="stubborn"))
    polite, stubborn = sup.pid("polite"), sup.pid("stubborn")
    assert polite and stubborn
    # Give the shells time to install the trap and fork sleep, else TERM hits too early.
    await wait_for(lambda: len(group_members(stubborn)) == 2, "stubborn's sleep")
    await wait_for(lambda: len(group_members(polite)) == 2, "polite's sleep")

    await sup.stop("polite", timeout_s=30)
    assert group_members(polite) == []
    await sup.stop("stubborn", timeout_s=0.3)
    assert group_members(stubborn) == []
    assert harness.states("polite")[-1] == "shutdown"
    assert harness.states("stubborn")[-1] == "shutdown"
    assert "failed" not in harness.states("polite") + harness.states("stubborn")
    assert sup.tasks() == {}
    await sup.stop("unknown")  # no-op


async def test_bad_command_fails_with_reason(harness):
    sup = await harness.supervisor()
    sup.ensure(harness.spec(("/nonexistent",)))
    await wait_for(lambda: "failed" in harness.states(), "failure")
    err = next(e for _, s, e, _ in harness.events if s == "failed")
    assert "/nonexistent" in err and "127" in err, err
    await sup.stop("t1")
    assert harness.states()[-1] == "shutdown"


async def test_missing_netns_fails_with_reason(harness):
    sup = await harness.supervisor()
    missing = "sntest-missing-" + secrets.token_hex(3)  # never created
    sup.ensure(TaskSpec(task_id="nons", name="x.1", netns=missing, argv=("true",), env=()))
    await wait_for(lambda: "failed" in harness.states("nons"), "failure")
    err = next(e for t, s, e, _ in harness.events if s == "failed" and t == "nons")
    assert "netns" in err and "127" in err, err
    await sup.stop("nons")
