"""Level-triggered overlay reconciler: snapshot what the kernel has, plan, apply.

Each ``reconcile(node)`` is a full pass over the node's whole desired overlay state, never an
incremental edit driven by the event that triggered it (STYLE item 10): whatever happened
before (a crash half-way through a previous pass, an operator deleting a link, a missed
gossip delete) is repaired by the next pass, because the plan is a diff against a fresh
snapshot. Rate limiting, periodic resync and "when" belong to the caller; this module has no
clock and no asyncio. It is synchronous because the kernel boundary is: the agent runs it in
a worker thread, one pass at a time.
"""

from __future__ import annotations

from dataclasses import dataclass

from swarmnet.kernel.errors import KernelError
from swarmnet.kernel.types import Kernel, KernelState, Op
from swarmnet.overlay.plan import NodeOverlay, desired, plan


@dataclass
class ReconcilerStats:
    """Counters for /metrics (monotonic since the reconciler was created)."""

    passes: int = 0  # reconcile() calls
    ops_applied: int = 0  # ops the kernel accepted, including those before a failure
    errors: int = 0  # KernelErrors seen (a retried one counts too)
    retries: int = 0  # passes that needed their one retry


class OverlayReconciler:
    """Drives one ``Kernel`` toward ``desired(node)``. Not thread-safe: one pass at a time."""

    def __init__(self, kernel: Kernel) -> None:
        self.kernel = kernel
        self.stats = ReconcilerStats()

    # Convenience accessors, so metrics code can read plain attributes.
    @property
    def passes(self) -> int:
        return self.stats.passes

    @property
    def ops_applied(self) -> int:
        return self.stats.ops_applied

    @property
    def errors(self) -> int:
        return self.stats.errors

    def reconcile(self, node: NodeOverlay) -> list[Op]:
        """One pass; returns the ops applied (those of a failed first attempt that the kernel
        accepted, then the retry's). A KernelError triggers one re-snapshot and retry, since
        the usual cause is a race with something else changing the kernel (a sandbox that
        vanished between listing and snapshotting, a link deleted under us); a second
        failure is raised to the caller, which retries on its own schedule."""
        self.stats.passes += 1
        applied: list[Op] = []
        for attempt in (1, 2):
            ops: list[Op] = []
            try:
                ops = self._plan(node)
                self.kernel.apply(ops)
            except KernelError as e:
                self.stats.errors += 1
                done = _accepted_before(ops, e)
                applied.extend(done)
                self.stats.ops_applied += len(done)
                if attempt == 2:
                    raise
                self.stats.retries += 1
                continue
            applied.extend(ops)
            self.stats.ops_applied += len(ops)
            break
        return applied

    def _plan(self, node: NodeOverlay) -> list[Op]:
        base = self.kernel.snapshot(None)
        netns = self.kernel.list_netns()
        # Only the sandboxes the plan looks inside: the desired ones that exist. Undesired
        # owned ones are deleted whole, so their content does not matter.
        wanted = desired(node).sandboxes
        sandboxes: dict[str, KernelState] = {}
        for name in sorted(wanted):
            if name in netns:
                sandboxes[name] = self.kernel.snapshot(name)
        return plan(node, base, netns, sandboxes)


def _accepted_before(ops: list[Op], e: KernelError) -> list[Op]:
    """The ops applied before the one ``e`` names (Kernel.apply stops at the first failure).
    If the error names no op of this list (it came from a snapshot), nothing was applied."""
    for i, op in enumerate(ops):
        if op is e.op:
            return ops[:i]
    for i, op in enumerate(ops):
        if op == e.op:
            return ops[:i]
    return []
