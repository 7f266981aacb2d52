"""Stand-ins shared by the in-process agent tests (API, node channel, local managers)."""

from __future__ import annotations

import socket
from typing import Any


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (these tests run next to real agents)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class StubWorker:
    """Stands in for swarmnet.worker.Worker: runs nothing and reports nothing (it would run
    task processes in network namespaces)."""

    class _Supervisor:
        def tasks(self) -> list:
            return []

    def __init__(self, **kwargs: Any) -> None:
        self.kwargs = kwargs
        self.supervisor = self._Supervisor()
        self.assignment = None

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        pass

    def local_tasks(self) -> list:
        return []
