"""Seams of the worker's level-triggered pass (worker.Worker.sync).

- ``EndpointSource``: where remote endpoints (task IP -> VTEP) come from. Issue 3's slice
  takes them from the manager's assignment (``AssignmentEndpoints``); gossip (issue 5)
  replaces it with the per-network tables, so the data plane keeps converging while the
  managers are busy or without quorum.
- ``SandboxHook``: per-sandbox services that live beside the overlay (embedded DNS, service
  load balancing). ``before_reconcile`` runs after tasks that must stop have stopped and
  before their sandboxes are deleted (release sockets and handles in them);
  ``after_reconcile`` runs once every wanted sandbox exists with its interfaces, before the
  task processes start (so a task's first DNS query already has an answer).
Both run on the agent's loop and must not block; kernel work goes through
``worker.run_in_kernel_thread``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from swarmnet.overlay.plan import RemoteEndpoint

if TYPE_CHECKING:
    from swarmnet.worker import Worker


class EndpointSource(Protocol):
    def remotes(self, assignment: dict) -> list[RemoteEndpoint]: ...


class AssignmentEndpoints:
    """The endpoints the manager lists in each assignment (issue 3's path)."""

    def remotes(self, assignment: dict) -> list[RemoteEndpoint]:
        return [
            RemoteEndpoint(network_id=e["network_id"], ip=e["address"].split("/")[0], vtep=e["vtep"])
            for e in assignment.get("endpoints", [])
        ]


class SandboxHook(Protocol):
    async def before_reconcile(self, worker: Worker, assignment: dict, sandboxes: set[str]) -> None:
        """``sandboxes``: the sandbox namespaces that stay; let go of every other one."""
        ...

    async def after_reconcile(self, worker: Worker, assignment: dict, running: list[dict]) -> None:
        """Every sandbox of ``running`` exists now; set up what the tasks need in it."""
        ...

    async def close(self) -> None: ...
