"""The worker's side of encrypted overlays: gate tasks, program ESP around the overlay pass,
acknowledge key sets, report counters.

``Worker.sync`` calls, in one level-triggered pass (under its kernel lock):

1. ``admit(worker, assignment, running)`` -> the tasks that may start. A task attached to an
   encrypted network on a node whose kernel cannot do ESP is reported ``failed`` with the
   ``EspUnsupported`` message (``service ps`` ERROR) and gets no sandbox; while the node
   has no key set yet (or the managers do not yet publish its sender epoch) such a task
   waits. Either way no VXLAN device exists for that network here: never cleartext.
2. ``before_reconcile`` programs XFRM for the *union* of what is programmed and what is
   wanted (peers, VNIs; keys are the key set's): a new encrypted VNI is marked and has its
   policies before the overlay pass creates its VXLAN device and FDB entries.
3. ``after_reconcile`` programs exactly what is wanted: a VNI or a peer leaves XFRM only
   after the overlay pass deleted its VXLAN device or FDB entries (a marked packet without
   a policy would leave in cleartext). Then the key-set version counts as applied.

Peers are the VTEPs of the remote endpoints (``worker.endpoints``: the assignment, or gossip)
on the encrypted networks this node admitted tasks on; both ends of a pair see each other
the same way, so both program the pair's SAs. SPIs and keys are derived (ipsec.keys), so no
per-SA message exists.

Sender epoch: when this agent finds no SA of ours in the kernel (first start, reboot,
flushed state) it takes a new epoch (persisted in ``epoch_path``) and reports it; it
programs nothing until its assignment carries that epoch, so peers derive the same SPIs.

Reports go to ``POST /cluster/ipsec`` on the node channel (mutual TLS): ``esp``, ``epoch``,
``applied`` when they change, ``counters`` (packets sent per key, for rotation by count)
every ``counters_s``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from swarmnet.ipsec import esp_support, esp_unsupported
from swarmnet.ipsec.keys import KeySet
from swarmnet.ipsec.plan import EspConfig, desired, diff, sent_by_key
from swarmnet.ipsec.rotation import NodeKeys
from swarmnet.kernel.xfrm_types import Xfrm, XfrmSnapshot

if TYPE_CHECKING:
    from swarmnet.worker import Worker

log = logging.getLogger(__name__)


def encrypted_networks(assignment: dict) -> dict[str, dict]:
    return {nid: n for nid, n in (assignment.get("networks") or {}).items() if n.get("encrypted")}


class IpsecHook:
    def __init__(
        self,
        xfrm: Xfrm,
        *,
        epoch_path: Path | None = None,
        esp_probe: Callable[[], tuple[bool, str]] = esp_support,
        cfg: EspConfig | None = None,
        counters_s: float = 30.0,
    ) -> None:
        self.xfrm = xfrm
        self.epoch_path = epoch_path
        self.esp_probe = esp_probe
        self.cfg = cfg or EspConfig()
        self.counters_s = counters_s
        self.keys = NodeKeys()
        self.esp: tuple[bool, str] | None = None  # probed on the first encrypted network
        self.epoch: int | None = None  # decided on the first pass with ESP
        self.ready: set[str] = set()  # encrypted networks admitted in the current pass
        self.last_snapshot: XfrmSnapshot | None = None
        self._reported: dict = {}
        self._counters_at = 0.0
        self._report_task: asyncio.Task | None = None
        self._refused: set[str] = set()  # tasks already reported failed for want of ESP

    # ---- 1. admission ---------------------------------------------------------------

    async def admit(self, worker: Worker, assignment: dict, running: list[dict]) -> list[dict]:
        enc = encrypted_networks(assignment)
        self.ready = set()
        touching = [t for t in running if any(a["network_id"] in enc for a in t["networks"])]
        if not enc and self.esp is None:
            return running  # never had an encrypted network: nothing to probe or clean
        if self.esp is None:
            self.esp = await _kx(worker, self.esp_probe)
            if not self.esp[0]:
                log.error("encrypted networks refused on this node: %s", self.esp[1])
        if not self.esp[0]:
            for t in touching:
                if t["id"] in self._refused:
                    continue  # reported once; the state keeps it (no report every pass)
                net = next(enc[a["network_id"]] for a in t["networks"] if a["network_id"] in enc)
                await _refuse(worker, t, str(esp_unsupported(net["name"], self.esp[1])))
                self._refused.add(t["id"])
            self._report(worker)
            return [t for t in running if t not in touching]
        if self.epoch is None:
            self.epoch = await _kx(worker, self._choose_epoch)
        ks = self._keyset(assignment, worker.vtep)
        if ks is not None:
            self.ready = set(enc)
        else:
            waiting = [t["name"] for t in touching]
            if waiting:
                log.info("encrypted networks: no key set/epoch yet, %s wait", ", ".join(waiting))
            for t in touching:
                if t["id"] in worker.supervisor.tasks():
                    await worker.supervisor.stop(t["id"])
        self._report(worker)
        return [t for t in running if t not in touching or ks is not None]

    def _keyset(self, assignment: dict, vtep: str) -> KeySet | None:
        """The key set to program, or None while it may not be used: none yet, or the
        managers do not publish our current epoch (peers would derive other SPIs)."""
        ip = assignment.get("ipsec") or {}
        if ip.get("keyset"):
            self.keys.offer(KeySet.from_dict(ip["keyset"]))
        if self.keys.received is None:
            return None
        if int((ip.get("epochs") or {}).get(vtep, -1)) != self.epoch:
            return None
        return self.keys.received

    def _choose_epoch(self) -> int:
        old = 0
        if self.epoch_path is not None and self.epoch_path.exists():
            old = int(self.epoch_path.read_text().strip() or 0)
        snap = self.xfrm.snapshot()
        ours = any(s.reqid == self.cfg.reqid for s in snap.states.values())
        epoch = old if ours else old + 1
        if self.epoch_path is not None and epoch != old:
            tmp = self.epoch_path.with_suffix(".tmp")
            tmp.write_text(f"{epoch}\n")
            tmp.replace(self.epoch_path)
        return epoch

    # ---- 2. and 3. programming ----------------------------------------------------------

    async def before_reconcile(self, worker: Worker, assignment: dict, running: list[dict]) -> None:
        await self._program(worker, assignment, running, additive=True)

    async def after_reconcile(self, worker: Worker, assignment: dict, running: list[dict]) -> None:
        version = await self._program(worker, assignment, running, additive=False)
        if version is not None and self.keys.done(worker.node_id, version) is not None:
            log.info("ipsec: key set v%d applied", version)
        self._report(worker)

    async def _program(
        self, worker: Worker, assignment: dict, running: list[dict], additive: bool
    ) -> int | None:
        if self.esp is None or not self.esp[0]:
            return None
        enc = encrypted_networks(assignment)
        nets = {a["network_id"] for t in running for a in t["networks"]} & self.ready
        vnis = {int(enc[n]["vni"]) for n in nets}
        peers = {r.vtep for r in worker.endpoints.remotes(assignment) if r.network_id in nets} - {
            worker.vtep
        }
        ks = self.keys.received if self.ready else None
        ip = assignment.get("ipsec") or {}
        epochs = {str(k): int(v) for k, v in (ip.get("epochs") or {}).items()}
        epochs[worker.vtep] = self.epoch or 0

        def work() -> int | None:
            have = self.xfrm.snapshot()
            want_peers, want_vnis, keyset = set(peers), set(vnis), ks
            if additive:
                want_vnis |= have.marks.vnis if have.marks else set()
                want_peers |= {
                    p.dst for p in have.policies.values()
                    if p.reqid == self.cfg.reqid and p.dir == "out"
                }  # fmt: skip
                if keyset is None and (want_vnis or want_peers):
                    return None  # nothing new may come without keys; removals come after
            want = desired(worker.vtep, want_peers, want_vnis, keyset, self.cfg, epochs)
            ops = diff(want, have, self.cfg)
            if ops:
                self.xfrm.apply(ops)
                log.info(
                    "ipsec: applied %d XFRM ops (%s)", len(ops), "add" if additive else "exact"
                )
            self.last_snapshot = self.xfrm.snapshot() if ops else have
            return None if keyset is None else keyset.version

        return await _kx(worker, work)

    # ---- reports --------------------------------------------------------------------

    def fresh_metrics(self) -> dict[str, int]:
        """``metrics`` of the kernel's state now (kernel thread: it reads XFRM)."""
        return self.metrics(self.xfrm.snapshot())

    def metrics(self, snap: XfrmSnapshot | None = None) -> dict[str, int]:
        """XFRM error counters (/proc/net/xfrm_stat, non-zero ones) and ICV failures of our
        SAs: tampered packets and packets under a wrong or removed key. Of ``snap``, or of
        the last sync's snapshot."""
        snap = snap if snap is not None else self.last_snapshot
        if snap is None:
            return {}
        out = {k: v for k, v in snap.stats.items() if v}
        out["IntegrityFailed"] = sum(
            s.integrity_failed for s in snap.states.values() if s.reqid == self.cfg.reqid
        )
        return out

    def _report(self, worker: Worker) -> None:
        body: dict[str, Any] = {}
        if self.esp is not None:
            body["esp"] = self.esp[0]
        if self.epoch is not None:
            body["epoch"] = self.epoch
        if self.keys.applied:
            body["applied"] = self.keys.applied
        now = time.monotonic()
        ks, snap = self.keys.received, self.last_snapshot
        due = now - self._counters_at >= self.counters_s
        if due and ks is not None and snap is not None and self.epoch is not None:
            peers = {p.dst for p in snap.policies.values() if p.dir == "out"}
            sent = sent_by_key(snap, worker.vtep, peers, ks, self.epoch)
            if sent:
                body["counters"] = {str(k): v for k, v in sent.items()}
        if (body == self._reported and not body.get("counters")) or not body:
            return
        if self._report_task is not None and not self._report_task.done():
            return  # one at a time; the next pass reports what is still new
        self._report_task = asyncio.create_task(self._send(worker, body, now))

    async def _send(self, worker: Worker, body: dict, now: float) -> None:
        session = getattr(worker, "_session", None)
        if session is None:
            return
        try:
            async with session.post(worker._url("/cluster/ipsec"), json=body) as resp:
                resp.raise_for_status()
        except Exception as e:  # noqa: BLE001 - retried on the next pass
            log.warning("ipsec report failed (%s); will retry", e)
            return
        self._reported = {k: v for k, v in body.items() if k != "counters"}
        if "counters" in body:
            self._counters_at = now

    async def close(self) -> None:
        if self._report_task is not None:
            self._report_task.cancel()
            await asyncio.gather(self._report_task, return_exceptions=True)


async def _refuse(worker: Worker, task: dict, err: str) -> None:
    if task["id"] in worker.supervisor.tasks():
        await worker.supervisor.stop(task["id"])
    worker._on_status(task["id"], "failed", err, None)


async def _kx(worker: Worker, fn: Callable, *args: Any) -> Any:
    """Run ``fn`` on the worker's kernel thread (every kernel call is serialised there)."""
    run = getattr(worker, "run_in_kernel_thread", None)
    if run is not None:
        return await run(fn, *args)
    return await asyncio.get_running_loop().run_in_executor(worker._kx, fn, *args)


def hook_for(kernel: object, data_dir: Path) -> IpsecHook:
    """The agent's hook: the real XFRM boundary beside the netlink kernel, the in-memory one
    (with ESP "supported") beside the fake kernel of tests."""
    from swarmnet.kernel.netlink import NetlinkKernel
    from swarmnet.kernel.xfrm import FakeXfrm, IpXfrm

    if isinstance(kernel, NetlinkKernel):
        return IpsecHook(IpXfrm(), epoch_path=data_dir / "ipsec-epoch")
    return IpsecHook(FakeXfrm(), epoch_path=data_dir / "ipsec-epoch", esp_probe=lambda: (True, ""))
