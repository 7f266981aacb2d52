"""Level-triggered overlay reconciler: snapshot what the kernel has, plan, apply.

Each ``reconcile(node)`` is a full pass over the node's whole desired overlay state, never an
incremental edit driven by the event that triggered it (STYLE item 10): whatever happened
before (a crash half-way through a previous pass, an operator deleting a link, a missed
gossip delete) is repaired by the next pass, because the plan is a diff against a fresh
snapshot. Rate limiting, periodic resync and "when" belong to the caller; this module has no
clock and no asyncio. It is synchronous because the kernel boundary is: the agent runs it in
a worker thread, one pass at a time.

Remote FDB/neighbour entries have a second writer: the worker's fast path
(``EntryGuard.fast_apply``), which applies gossip deltas from its own thread and netlink
socket so that they never queue behind a full pass. The two share one ``EntryGuard``, and
the rule that keeps them from undoing each other is:

- every read of the remote endpoints is offered to the guard (``offer``) in the order it was
  made, and the full pass programs the NEWEST read, not the one its caller started with;
- the fast path applies its delta under the guard's lock and bumps ``gen``;
- the full pass applies its link/namespace ops without the lock, then takes the lock, and if
  a fast-path op ran since its snapshot (``gen`` moved) or a newer read arrived, plans again
  against a fresh snapshot before applying its FDB/neighbour ops.

So neither can delete an entry the other has just added on newer information: the full
pass's entry ops are always a diff of the newest read against a snapshot no fast op has
changed since, and the fast path's deltas are diffs against the model the full pass leaves
behind (set under the same lock).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, replace

from swarmnet.kernel.errors import KernelError
from swarmnet.kernel.types import FdbAdd, FdbDel, Kernel, KernelState, NeighAdd, NeighDel, Op
from swarmnet.overlay.plan import NodeOverlay, RemoteEndpoint, desired, plan, remote_delta

_ENTRY_OPS = (FdbAdd, FdbDel, NeighAdd, NeighDel)


@dataclass(frozen=True)
class RemotesRead:
    """One read of the remote endpoints: ``seq`` orders reads (the reader's counter);
    ``mark`` is the endpoint source's own event count at the read (what it may report as
    programmed once the read is in the kernel; None if the source has none)."""

    seq: int
    remotes: tuple[RemoteEndpoint, ...]
    mark: int | None = None


class EntryGuard:
    """What the full pass and the fast path share (see the module docstring).

    ``offer`` is called from ONE thread (the agent's loop), in read order; everything else
    from the kernel threads. ``model`` is the NodeOverlay the kernel's remote entries were
    last brought to (None: unknown, only a full pass can say), with ``model_read`` the read
    it holds."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.latest: RemotesRead | None = None  # the newest read offered
        self.model: NodeOverlay | None = None
        self.model_read: RemotesRead | None = None
        self.gen = 0  # bumped by every fast-path apply (even a failed one)
        self.replans = 0  # full passes that had to plan their entries again under the lock

    def offer(self, read: RemotesRead) -> None:
        if self.latest is None or read.seq > self.latest.seq:
            self.latest = read  # one reference store: atomic for the readers

    def fast_apply(
        self,
        kernel: Kernel,
        read: RemotesRead,
        on_locked: Callable[[], None] | None = None,
        expect: NodeOverlay | None = None,
    ) -> tuple[int, bool]:
        """The fast path: the FDB/neighbour delta from the model to ``read`` (see
        ``plan.remote_delta``). Returns the ops applied and whether a full pass is still
        needed. Raises KernelError (the model is then unknown: a full pass must repair).
        ``on_locked`` is called once the lock is held (the caller's timing metrics).
        ``expect``: a node the caller wants the kernel brought to; unless the model equals
        it in everything but the remotes, nothing is done and a full pass is asked for."""
        with self.lock:
            if on_locked is not None:
                on_locked()
            model = self.model
            if model is None:
                return 0, True  # kernel state unknown: only a full pass can do it
            if expect is not None and replace(model, remotes=()) != replace(expect, remotes=()):
                return 0, True
            if self.model_read is not None and read.seq <= self.model_read.seq:
                return 0, False  # a full pass already programmed this read or a newer one
            ops, new, rest_changed = remote_delta(model, read.remotes)
            if ops:
                self.model = None  # until the ops are known to be in
                self.gen += 1
                kernel.apply(ops)
            self.model, self.model_read = new, read
            return len(ops), rest_changed


@dataclass
class ReconcilerStats:
    """Counters for /metrics (monotonic since the reconciler was created)."""

    passes: int = 0  # reconcile() calls
    ops_applied: int = 0  # ops the kernel accepted, including those before a failure
    errors: int = 0  # KernelErrors seen (a retried one counts too)
    retries: int = 0  # passes that needed their one retry


class OverlayReconciler:
    """Drives one ``Kernel`` toward ``desired(node)``. Not thread-safe: one pass at a time."""

    def __init__(self, kernel: Kernel, guard: EntryGuard | None = None) -> None:
        self.kernel = kernel
        self.stats = ReconcilerStats()
        # Shared with a fast path on another thread (None: this pass is the only writer).
        self.guard = guard
        self.last_read: RemotesRead | None = None  # the read the last pass programmed

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
            done: list[Op] = []
            try:
                if self.guard is None:
                    self._run(self._plan(node), done)
                else:
                    self._guarded_pass(node, self.guard, done)
            except KernelError:
                self.stats.errors += 1
                applied.extend(done)
                self.stats.ops_applied += len(done)
                if attempt == 2:
                    raise
                self.stats.retries += 1
                continue
            applied.extend(done)
            self.stats.ops_applied += len(done)
            break
        return applied

    def _run(self, ops: list[Op], done: list[Op]) -> None:
        """Apply ``ops``; ``done`` gets those the kernel accepted (all, or those before the
        failing one, which is raised)."""
        try:
            self.kernel.apply(ops)
        except KernelError as e:
            done.extend(_accepted_before(ops, e))
            raise
        done.extend(ops)

    def _guarded_pass(self, node: NodeOverlay, guard: EntryGuard, done: list[Op]) -> None:
        """One attempt with a concurrent fast path (the rule in the module docstring). The
        plan puts every FDB/neighbour op last, so its tail of entry ops is what the lock
        covers; the links, namespaces and addresses before it are the fast path's business
        only in that they may make its next op fail, which sends it back to a full pass."""
        gen0 = guard.gen
        read = guard.latest
        if read is not None:
            node = replace(node, remotes=read.remotes)
        ops = self._plan(node)
        k = len(ops)
        while k and isinstance(ops[k - 1], _ENTRY_OPS):
            k -= 1
        try:
            self._run(ops[:k], done)
        except KernelError:
            with guard.lock:  # a device may have gone with its entries: the model is unknown
                guard.model = None
            raise
        with guard.lock:
            guard.model = None  # until this pass's entries are known to be in
            tail = ops[k:]
            if guard.gen != gen0 or guard.latest is not read:
                # A fast-path op may have changed what the snapshot said, or newer remotes
                # arrived: the entries are planned again from a fresh snapshot, with no
                # fast-path op able to run in between.
                guard.replans += 1
                read = guard.latest
                if read is not None:
                    node = replace(node, remotes=read.remotes)
                tail = self._plan(node)
            self._run(tail, done)
            guard.model, guard.model_read = node, read
        self.last_read = read

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
