"""A 3-node Raft cluster of ``raft_node.py`` processes on loopback (test and bench harness).

Each node gets its own 127.0.0.x address (all of 127/8 is loopback on Linux), so raft and
control ports never collide with a running agent. Only this harness's own pids are ever
signalled; its temporary directory is removed by ``close``.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

NODE = Path(__file__).with_name("raft_node.py")
ROOT = Path(__file__).resolve().parent.parent


def free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class Cluster:
    def __init__(
        self,
        n: int = 3,
        mode: str = "store",
        fsync: bool = True,
        compact: int = 5000,
        base: str = "127.0.0",
        first_host: int = 61,
        extra_args: tuple[str, ...] = (),
    ):
        self.mode, self.fsync, self.compact = mode, fsync, compact
        self.extra_args = list(extra_args)
        self.dir = Path(tempfile.mkdtemp(prefix="snraft-"))
        self.hosts = [f"{base}.{first_host + i}" for i in range(n)]
        self.raft = [f"{h}:{free_port(h)}" for h in self.hosts]
        self.ctl = [free_port("127.0.0.1") for _ in range(n)]
        self.procs: list[subprocess.Popen | None] = [None] * n

    # ---- processes --------------------------------------------------------------------

    def start(self, i: int) -> None:
        peers = ",".join(a for j, a in enumerate(self.raft) if j != i)
        argv = [
            sys.executable, str(NODE), "--self", self.raft[i], "--peers", peers,
            "--dir", str(self.dir / f"n{i}"), "--ctl", str(self.ctl[i]), "--mode", self.mode,
            "--compact", str(self.compact),
        ]  # fmt: skip
        if not self.fsync:
            argv.append("--no-fsync")
        argv += self.extra_args
        log = open(self.dir / f"n{i}.log", "ab")
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        self.procs[i] = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=log, env=env)
        line = self.procs[i].stdout.readline()  # type: ignore[union-attr]
        if b"READY" not in line:
            raise RuntimeError(f"node {i} did not start: {(self.dir / f'n{i}.log').read_text()}")

    def start_all(self) -> None:
        for i in range(len(self.raft)):
            self.start(i)

    def kill(self, i: int) -> None:
        p = self.procs[i]
        if p is not None and p.poll() is None:
            p.send_signal(signal.SIGKILL)
            p.wait()
        self.procs[i] = None

    def alive(self) -> list[int]:
        return [i for i, p in enumerate(self.procs) if p is not None and p.poll() is None]

    def cpu_seconds(self) -> float:
        """user + system CPU time of the live node processes, every thread included. Per
        write, it is the cost that the machine's load does not change (unlike writes/s)."""
        tick = os.sysconf("SC_CLK_TCK")
        total = 0.0
        for i in self.alive():
            p = self.procs[i]
            assert p is not None
            fields = Path(f"/proc/{p.pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick  # utime, stime
        return total

    def close(self) -> None:
        for i in range(len(self.procs)):
            self.kill(i)
        shutil.rmtree(self.dir, ignore_errors=True)

    # ---- control ----------------------------------------------------------------------

    def call(self, i: int, path: str, body: Any = None, timeout: float = 15.0) -> tuple[int, Any]:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(
            f"http://127.0.0.1:{self.ctl[i]}{path}",
            data=data,
            method="GET" if body is None else "POST",
            headers={"Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                return resp.status, json.loads(resp.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"{}")

    def status(self, i: int) -> dict | None:
        try:
            return self.call(i, "/status", timeout=5.0)[1]
        except OSError:
            return None

    def leader(self, timeout_s: float = 30.0) -> int:
        """The node that says it leads and that the others follow."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for i in self.alive():
                st = self.status(i)
                if st and st["leader"]:
                    return i
            time.sleep(0.02)
        raise TimeoutError("no leader")

    def init(self) -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            code, _ = self.call(self.leader(), "/init", {})
            if code == 200:
                return
            time.sleep(0.1)
        raise TimeoutError("init did not commit")
