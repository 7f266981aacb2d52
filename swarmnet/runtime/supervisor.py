"""Task processes: start, watch, restart, adopt and stop them.

A task is one process (and its process group) running in a sandbox made by
``swarmnet.runtime.enter``: the task's network namespace (created beforehand by the overlay
reconciler), private UTS and mount namespaces, its own hostname, resolv.conf and hosts.

Design choices, and why:

- **Processes outlive the agent.** Each task starts in its own session (``setsid``), so it is
  its own process-group leader, survives the agent, and can be signalled as a group. The
  supervisor persists ``tasks.json`` (task id -> pid, start time, spec) on every change; a
  new agent ``start()``s, re-verifies each pid *and* its start time (``/proc/PID/stat``
  field 22) so that a recycled pid is never mistaken for our task, and adopts the survivors
  without touching them: an agent restart must not disturb traffic.
- **One watcher for all.** Own children and adopted processes are watched the same way: a
  pidfd (``os.pidfd_open``) registered with ``loop.add_reader``; it becomes readable when the
  process exits. No polling, no SIGCHLD.
- **Exactly one reaper.** We spawn with ``subprocess.Popen`` rather than
  ``asyncio.create_subprocess_exec``: asyncio's child watcher (or uvloop's) would reap the
  child itself and race our pidfd. With Popen nothing else knows the pid; we reap it with
  ``Popen.poll()`` (``waitpid(pid, WNOHANG)``) when the pidfd fires. The Popen object is
  kept referenced until then, since a collected running Popen lands in
  ``subprocess._active`` and gets reaped behind our back. Adopted processes are normally
  children of init, which reaps them; we try ``waitpid`` anyway (they may be our own
  children from a previous Supervisor in the same process, as in tests).
- **Group kill safety.** A process-group id is the leader's pid, and a pid cannot be reused
  while the leader is an unreaped zombie. So we signal the group before reaping the leader,
  and during ``stop()`` the leader stays unreaped until the group is gone.
- **Backoff.** A task that exits unexpectedly is reported ``failed`` and restarted under the
  same task id after ``restart_delay_s`` doubling to ``restart_delay_max_s``; the doubling
  resets once a run lasted ``restart_reset_s``.

Everything here runs on the event loop thread; blocking work is limited to small file
writes (one fsync per state change), fork+exec, and a /proc scan while a task is stopping.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

STATE_FILE = "tasks.json"
STATE_VERSION = 1  # bump when the tasks.json layout changes incompatibly
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"  # docker's
LAB_ENV = "SWARMNET_LAB_ID"  # passed through so the lab can find a host's processes
HOSTNAME_MAX = 64  # Linux HOST_NAME_MAX: sethostname(2) rejects longer names
EXIT_NOT_FOUND = 127  # enter.py's (and a shell's) "the command never ran"
CLK_TCK = os.sysconf("SC_CLK_TCK")  # unit of /proc/PID/stat starttime

StatusCallback = Callable[[str, str, str, int | None], None]

STARTING, RUNNING, FAILED, SHUTDOWN = "starting", "running", "failed", "shutdown"

_TASK_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class RuntimeConfigError(ValueError):
    """A RuntimeConfig value is out of range."""


class TaskSpecError(ValueError):
    """A TaskSpec cannot be run (bad id, name, command or hosts line)."""


class SupervisorError(RuntimeError):
    """The Supervisor was used out of order (ensure before start, after close)."""


@dataclass(frozen=True)
class RuntimeConfig:
    """Timing and paths of the task runtime. Every default says why it is what it is."""

    stop_timeout_s: float = 10.0
    """Grace between SIGTERM and SIGKILL on stop: docker's default (``docker stop -t 10``)."""

    kill_timeout_s: float = 5.0
    """How long to wait for the group to vanish after SIGKILL before giving up with a log
    line (a process stuck in uninterruptible sleep); SIGKILL itself needs milliseconds."""

    restart_delay_s: float = 0.5
    """First restart delay after an unexpected exit: short, so a one-off crash costs little."""

    restart_delay_max_s: float = 10.0
    """Cap of the doubling backoff: a crash-looping task restarts at most every 10 s."""

    restart_reset_s: float = 10.0
    """A run at least this long resets the backoff: the task was healthy, the crash is new."""

    stop_poll_interval_s: float = 0.05
    """How often stop() checks whether the process group is gone (a /proc scan)."""

    python: str = sys.executable
    """Interpreter that runs ``-m swarmnet.runtime.enter``: the agent's own, which has the
    package installed."""

    resolv_conf_source: Path = Path("/etc/resolv.conf")
    """Copied to each task's resolv.conf until the embedded DNS (127.0.0.11) takes over."""

    def validate(self) -> None:
        if self.stop_timeout_s < 0 or self.kill_timeout_s <= 0:
            raise RuntimeConfigError("stop and kill timeouts must be positive")
        if not 0 < self.restart_delay_s <= self.restart_delay_max_s:
            raise RuntimeConfigError("need 0 < restart_delay_s <= restart_delay_max_s")
        if self.stop_poll_interval_s <= 0:
            raise RuntimeConfigError("stop_poll_interval_s must be positive")


@dataclass(frozen=True)
class TaskSpec:
    task_id: str
    name: str  # "<service>.<slot>", also the hostname
    netns: str  # name under /run/netns, already created
    argv: tuple[str, ...]
    env: tuple[tuple[str, str], ...]  # the SWARMNET_* vars etc., set by the caller
    hosts: tuple[tuple[str, str], ...] = ()  # (ip, name) lines for /etc/hosts besides localhost
    # The task's resolv.conf, verbatim; None: a copy of RuntimeConfig.resolv_conf_source.
    # The worker passes "nameserver 127.0.0.11\noptions ndots:0\n" (the embedded DNS).
    resolv_conf: str | None = None

    def __post_init__(self) -> None:
        # task_id names a directory under state_dir: keep it a plain file name.
        if not _TASK_ID_RE.match(self.task_id):
            raise TaskSpecError(f"task_id {self.task_id!r}: want [A-Za-z0-9_.-]+")
        if not self.name or len(self.name) > HOSTNAME_MAX or any(c.isspace() for c in self.name):
            raise TaskSpecError(f"name {self.name!r}: want 1-{HOSTNAME_MAX} chars, no spaces")
        if not self.netns or "/" in self.netns:
            raise TaskSpecError(f"netns {self.netns!r}: want a name under /run/netns")
        if not self.argv:
            raise TaskSpecError("argv: empty command")
        for ip, name in self.hosts:
            if not ip or not name or "\n" in ip + name or "#" in ip + name:
                raise TaskSpecError(f"hosts line {ip!r} {name!r}")

    def to_json(self) -> dict:
        return {
            "task_id": self.task_id,
            "name": self.name,
            "netns": self.netns,
            "argv": list(self.argv),
            "env": [list(kv) for kv in self.env],
            "hosts": [list(h) for h in self.hosts],
            "resolv_conf": self.resolv_conf,
        }

    @classmethod
    def from_json(cls, d: dict) -> TaskSpec:
        return cls(
            task_id=d["task_id"],
            name=d["name"],
            netns=d["netns"],
            argv=tuple(d["argv"]),
            env=tuple((k, v) for k, v in d["env"]),
            hosts=tuple((ip, n) for ip, n in d.get("hosts", ())),
            resolv_conf=d.get("resolv_conf"),
        )


@dataclass(frozen=True)
class PersistedTask:
    """One entry of tasks.json. ``pid``/``start_ticks`` are None while a restart is pending."""

    spec: TaskSpec
    pid: int | None
    start_ticks: int | None  # /proc/PID/stat starttime, clock ticks since boot


# ---- pure helpers (unit-tested) ---------------------------------------------------------


def restart_delay(config: RuntimeConfig, failures: int) -> float:
    """Delay before restart number ``failures`` (1 = first failure in a row)."""
    if failures <= 1:
        return min(config.restart_delay_s, config.restart_delay_max_s)
    # Cap the exponent: 2**failures overflows float after ~1000 crashes.
    return min(config.restart_delay_s * 2.0 ** min(failures - 1, 64), config.restart_delay_max_s)


def render_hosts(spec: TaskSpec) -> str:
    lines = ["127.0.0.1\tlocalhost", "::1\tlocalhost ip6-localhost ip6-loopback"]
    lines += [f"{ip}\t{name}" for ip, name in spec.hosts]
    return "\n".join(lines) + "\n"


def encode_state(tasks: dict[str, PersistedTask]) -> bytes:
    body = {
        tid: {"pid": t.pid, "start_ticks": t.start_ticks, "spec": t.spec.to_json()}
        for tid, t in sorted(tasks.items())
    }
    return json.dumps({"version": STATE_VERSION, "tasks": body}, indent=1).encode()


def decode_state(data: bytes) -> dict[str, PersistedTask]:
    """Raises ValueError (or KeyError/TypeError) on a malformed file."""
    doc = json.loads(data)
    if doc.get("version") != STATE_VERSION:
        raise ValueError(f"tasks.json version {doc.get('version')!r}, want {STATE_VERSION}")
    out = {}
    for tid, t in doc["tasks"].items():
        spec = TaskSpec.from_json(t["spec"])
        if spec.task_id != tid:
            raise ValueError(f"tasks.json: key {tid!r} holds task {spec.task_id!r}")
        out[tid] = PersistedTask(spec=spec, pid=t["pid"], start_ticks=t["start_ticks"])
    return out


def parse_stat(text: str) -> tuple[str, int, int]:
    """(state, pgrp, starttime) from the text of /proc/PID/stat. The command name (field 2)
    may hold spaces and parentheses, so split after the *last* ')'."""
    rest = text[text.rindex(")") + 2 :].split()
    # rest[0] is field 3 (state); field N is rest[N - 3].
    return rest[0], int(rest[5 - 3]), int(rest[22 - 3])


def enter_argv(python: str, spec: TaskSpec, resolv: Path, hosts: Path) -> list[str]:
    """The launcher command line that runs ``spec.argv`` in the task's sandbox."""
    opts = ["--netns", spec.netns, "--hostname", spec.name]
    opts += ["--resolv", str(resolv), "--hosts", str(hosts)]
    return [python, "-m", "swarmnet.runtime.enter", *opts, "--", *spec.argv]


def task_env(spec: TaskSpec, agent_env: Mapping[str, str]) -> dict[str, str]:
    """The task's environment: exactly the spec's, plus a default PATH, plus the lab id of
    the agent (never the rest of the agent's environment, as with docker)."""
    env = dict(spec.env)
    env.setdefault("PATH", DEFAULT_PATH)
    if LAB_ENV in agent_env:
        env.setdefault(LAB_ENV, agent_env[LAB_ENV])
    return env


def exit_reason(returncode: int | None) -> str:
    if returncode is None:
        return "process exited (status unknown: not a child of this agent)"
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = str(-returncode)
        return f"killed by signal {name}"
    return f"exit code {returncode}"


def first_error_line(data: bytes) -> str:
    """The line that explains an exit 127: enter.py's own "swarmnet: ..." line if present,
    else the last non-empty line (a shell's "sh: 1: foo: not found")."""
    lines = [ln.strip() for ln in data.decode(errors="replace").splitlines() if ln.strip()]
    for ln in lines:
        if ln.startswith("swarmnet:"):
            return ln
    return lines[-1] if lines else ""


def _read_stat(pid: int) -> tuple[str, int, int] | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return parse_stat(f.read())
    except (OSError, ValueError, IndexError):
        return None


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes whose process group is ``pgid``."""
    out = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        st = _read_stat(int(entry.name))
        if st is not None and st[1] == pgid and st[0] not in "ZXx":
            out.append(int(entry.name))
    return out


def _boot_ticks() -> float:
    # starttime in /proc/PID/stat counts from boot including suspend (CLOCK_BOOTTIME).
    return time.clock_gettime(time.CLOCK_BOOTTIME) * CLK_TCK


def _write_atomic(path: Path, data: bytes) -> None:
    """Atomic against a crash of the agent (write, then rename), deliberately NOT fsynced:
    the file lets a restarted agent adopt the task processes still running, and a process
    crash loses no page cache; after a host crash (the only case fsync would cover) those
    processes are gone too, so a stale or lost file costs nothing. The two fsyncs cost up
    to ~100 ms on the event loop at every task start (measured with a loop-lag probe under
    bench/gossip_lab.py), delaying gossip for every endpoint of the node."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


# Popen objects of children left running by close(): kept referenced so that their
# __del__ never queues them for subprocess's own reaping (a later Supervisor may adopt and
# reap them; after the agent exits, init does).
_DETACHED: list[subprocess.Popen] = []


@dataclass(eq=False)
class _Task:
    spec: TaskSpec
    state: str = STARTING
    pid: int | None = None
    start_ticks: int | None = None
    popen: subprocess.Popen | None = None  # None for adopted processes
    pidfd: int | None = None
    failures: int = 0  # unexpected exits in a row (backoff exponent)
    restart: asyncio.TimerHandle | None = None
    log_offset: int | None = None  # output.log size when this run started
    stopping: asyncio.Task | None = None


class Supervisor:
    """Runs task processes. All methods must be called on the event loop thread.

    ``on_status(task_id, state, error, pid)`` is called on the loop thread for every state
    change ("starting", "running", "failed", "shutdown"); it must not block."""

    def __init__(
        self,
        state_dir: Path,
        on_status: StatusCallback,
        *,
        config: RuntimeConfig = RuntimeConfig(),  # frozen, so one shared default is safe
    ) -> None:
        config.validate()
        self._dir = Path(state_dir)
        self._on_status = on_status
        self._cfg = config
        self._tasks: dict[str, _Task] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False

    # ---- public API ---------------------------------------------------------------------

    async def start(self) -> None:
        """Load tasks.json and adopt the processes that are still ours."""
        if self._loop is not None:
            raise SupervisorError("start() called twice")
        self._loop = asyncio.get_running_loop()
        self._dir.mkdir(parents=True, exist_ok=True)
        persisted = self._load()
        for tid, p in persisted.items():
            rec = _Task(spec=p.spec)
            pidfd = self._verify(p.pid, p.start_ticks) if p.pid and p.start_ticks else None
            if pidfd is None:
                # Gone (or never restarted after a failure): forget it; the orchestrator's
                # next ensure() starts it afresh.
                self._remove_files(tid)
                self._report(tid, FAILED, "process not running after agent restart", None)
                continue
            rec.pid, rec.start_ticks, rec.pidfd, rec.state = p.pid, p.start_ticks, pidfd, RUNNING
            self._tasks[tid] = rec
            self._loop.add_reader(pidfd, self._on_exit, rec)
            log.info("adopted task %s pid %d", tid, p.pid)
            self._report(tid, RUNNING, "", p.pid)
        self._persist()

    def ensure(self, spec: TaskSpec) -> None:
        """Make sure the task runs. Idempotent: a running or starting task, or one waiting
        for its backoff restart, is left alone (calling ensure() in a reconcile loop must
        not defeat the backoff); a task being stopped is left to stop."""
        if self._loop is None or self._closed:
            raise SupervisorError("ensure() needs a started, open Supervisor")
        rec = self._tasks.get(spec.task_id)
        if rec is not None:
            if rec.stopping is None and rec.restart is not None:
                rec.spec = spec  # the restart uses the newest spec
            return
        rec = _Task(spec=spec)
        self._tasks[spec.task_id] = rec
        self._spawn(rec)

    async def stop(self, task_id: str, timeout_s: float | None = None) -> None:
        """SIGTERM the task's process group, SIGKILL it after ``timeout_s`` (default
        ``config.stop_timeout_s``), wait until it is gone, drop its files, report
        "shutdown". Unknown id: no-op. Concurrent calls share one stop."""
        rec = self._tasks.get(task_id)
        if rec is None:
            return
        if rec.stopping is None:
            timeout = self._cfg.stop_timeout_s if timeout_s is None else timeout_s
            rec.stopping = asyncio.get_running_loop().create_task(self._do_stop(rec, timeout))
        await asyncio.shield(rec.stopping)

    def pid(self, task_id: str) -> int | None:
        rec = self._tasks.get(task_id)
        return rec.pid if rec is not None else None

    def tasks(self) -> dict[str, int]:
        """task_id -> pid of the tasks whose process is live."""
        return {tid: r.pid for tid, r in self._tasks.items() if r.pid is not None}

    async def close(self) -> None:
        """Stop watching and LEAVE the task processes running: the next agent adopts them.
        In-flight stops finish first; pending restarts are dropped (the tasks stay in
        tasks.json without a pid, so the next agent reports them failed)."""
        if self._closed:
            return
        self._closed = True
        pending = [r.stopping for r in self._tasks.values() if r.stopping is not None]
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)
        for rec in self._tasks.values():
            if rec.restart is not None:
                rec.restart.cancel()
                rec.restart = None
            self._unwatch(rec)
            if rec.popen is not None:
                _DETACHED.append(rec.popen)
                rec.popen = None
        if self._loop is not None:
            self._persist()
        self._tasks.clear()

    # ---- starting -----------------------------------------------------------------------

    def _spawn(self, rec: _Task) -> None:
        spec, tid = rec.spec, rec.spec.task_id
        rec.state = STARTING
        self._report(tid, STARTING, "", None)
        tdir = self._dir / tid
        try:
            tdir.mkdir(parents=True, exist_ok=True)
            resolv, hosts = tdir / "resolv.conf", tdir / "hosts"
            if spec.resolv_conf is not None:
                resolv_text = spec.resolv_conf.encode()
            else:
                try:
                    resolv_text = self._cfg.resolv_conf_source.read_bytes()
                except FileNotFoundError:
                    resolv_text = b""  # no host resolvers: libc falls back to 127.0.0.1
            # Written in place (not renamed) so that a later rewrite reaches the bind mount.
            resolv.write_bytes(resolv_text)
            hosts.write_text(render_hosts(spec))
            argv = enter_argv(self._cfg.python, spec, resolv, hosts)
            env = task_env(spec, os.environ)
            logfd = os.open(tdir / "output.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o640)
            try:
                rec.log_offset = os.fstat(logfd).st_size
                popen = subprocess.Popen(
                    argv,
                    stdin=subprocess.DEVNULL,
                    stdout=logfd,
                    stderr=logfd,
                    env=env,
                    cwd="/",  # like docker's default WORKDIR; never pin the agent's cwd
                    start_new_session=True,
                    close_fds=True,
                    umask=0o022,  # the agent runs with 077 (private data files); tasks get the usual
                )
            finally:
                os.close(logfd)
        except OSError as e:
            self._failed(rec, f"start: {e}", ran_s=0.0)
            return
        rec.popen, rec.pid = popen, popen.pid
        # The child is unreaped until we poll it, so its /proc entry and pid are stable.
        st = _read_stat(popen.pid)
        rec.start_ticks = st[2] if st else None
        rec.pidfd = os.pidfd_open(popen.pid)
        assert self._loop is not None
        self._loop.add_reader(rec.pidfd, self._on_exit, rec)
        rec.state = RUNNING
        self._persist()
        log.info("task %s started, pid %d", tid, popen.pid)
        self._report(tid, RUNNING, "", popen.pid)

    def _verify(self, pid: int, start_ticks: int) -> int | None:
        """A pidfd for ``pid`` if it is still the process we started (same start time)."""
        try:
            pidfd = os.pidfd_open(pid)
        except OSError:
            return None
        # pidfd first, then the start-time check: if they match, the pidfd refers to our
        # process (a recycled pid would show a later start time).
        st = _read_stat(pid)
        if st is None or st[2] != start_ticks or st[0] in "ZXx":
            os.close(pidfd)
            if st is not None and st[2] == start_ticks:
                _try_reap(pid)  # our zombie from an earlier Supervisor in this process
            return None
        return pidfd

    # ---- exits and restarts -------------------------------------------------------------

    def _on_exit(self, rec: _Task) -> None:
        """The pidfd of ``rec`` became readable: its process exited."""
        if rec.pidfd is None:
            return  # already unwatched by stop() or close()
        self._unwatch(rec)
        if rec.stopping is not None:
            return  # _do_stop reaps once the whole group is gone
        pid = rec.pid
        assert pid is not None
        # Kill what the task left in its group, while the unreaped leader pins the pgid.
        _killpg(pid, signal.SIGKILL)
        rc = rec.popen.poll() if rec.popen is not None else _try_reap(pid)
        error = exit_reason(rc)
        if rc == EXIT_NOT_FOUND and rec.log_offset is not None:
            hint = self._log_tail(rec.spec.task_id, rec.log_offset)
            if hint:
                error = f"{error}: {hint}"
        ran_s = (_boot_ticks() - rec.start_ticks) / CLK_TCK if rec.start_ticks else 0.0
        rec.pid = rec.start_ticks = rec.popen = None
        log.warning("task %s pid %d exited: %s", rec.spec.task_id, pid, error)
        self._failed(rec, error, ran_s=ran_s)

    def _failed(self, rec: _Task, error: str, *, ran_s: float) -> None:
        if ran_s >= self._cfg.restart_reset_s:
            rec.failures = 0
        rec.failures += 1
        rec.state = FAILED
        delay = restart_delay(self._cfg, rec.failures)
        assert self._loop is not None
        rec.restart = self._loop.call_later(delay, self._restart, rec)
        self._persist()
        self._report(rec.spec.task_id, FAILED, error, None)

    def _restart(self, rec: _Task) -> None:
        rec.restart = None
        if self._closed or rec.stopping is not None:
            return
        if self._tasks.get(rec.spec.task_id) is not rec:
            return
        self._spawn(rec)

    # ---- stopping -----------------------------------------------------------------------

    async def _do_stop(self, rec: _Task, timeout_s: float) -> None:
        tid = rec.spec.task_id
        if rec.restart is not None:
            rec.restart.cancel()
            rec.restart = None
        pid = rec.pid
        if pid is not None:
            _killpg(pid, signal.SIGTERM)
            if not await self._wait_group_gone(pid, timeout_s):
                log.info("task %s ignored SIGTERM for %.1fs: SIGKILL", tid, timeout_s)
                _killpg(pid, signal.SIGKILL)
                if not await self._wait_group_gone(pid, self._cfg.kill_timeout_s):
                    log.error("task %s: process group %d survived SIGKILL", tid, pid)
            self._unwatch(rec)
            if rec.popen is not None:
                rec.popen.poll()
            else:
                _try_reap(pid)
        rec.pid = rec.start_ticks = rec.popen = None
        if self._tasks.get(tid) is rec:
            del self._tasks[tid]
        self._persist()
        self._remove_files(tid)
        log.info("task %s stopped", tid)
        self._report(tid, SHUTDOWN, "", None)

    async def _wait_group_gone(self, pgid: int, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while group_members(pgid):
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(self._cfg.stop_poll_interval_s)
        return True

    # ---- plumbing -----------------------------------------------------------------------

    def _unwatch(self, rec: _Task) -> None:
        if rec.pidfd is not None:
            if self._loop is not None:
                self._loop.remove_reader(rec.pidfd)
            os.close(rec.pidfd)
            rec.pidfd = None

    def _report(self, tid: str, state: str, error: str, pid: int | None) -> None:
        try:
            self._on_status(tid, state, error, pid)
        except Exception:  # a broken callback must not break supervision
            log.exception("on_status(%s, %s) raised", tid, state)

    def _load(self) -> dict[str, PersistedTask]:
        path = self._dir / STATE_FILE
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return {}
        try:
            return decode_state(data)
        except (ValueError, KeyError, TypeError) as e:
            # Written atomically, so this is not a torn write: keep it for a human.
            bad = path.with_name(f"{STATE_FILE}.corrupt")
            os.replace(path, bad)
            log.error("unreadable %s (%s): moved to %s, starting empty", path, e, bad)
            return {}

    def _persist(self) -> None:
        state = {
            tid: PersistedTask(spec=r.spec, pid=r.pid, start_ticks=r.start_ticks)
            for tid, r in self._tasks.items()
        }
        _write_atomic(self._dir / STATE_FILE, encode_state(state))

    def _remove_files(self, tid: str) -> None:
        shutil.rmtree(self._dir / tid, ignore_errors=True)

    def _log_tail(self, tid: str, offset: int) -> str:
        try:
            with open(self._dir / tid / "output.log", "rb") as f:
                f.seek(offset)
                return first_error_line(f.read(8192))
        except OSError:
            return ""


def _killpg(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def _try_reap(pid: int) -> int | None:
    """Exit status of ``pid`` if it is our exited child, else None."""
    try:
        got, status = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return None
    return os.waitstatus_to_exitcode(status) if got == pid else None
