"""The transmit-limited broadcast queue (memberlist ``queue.go``), over message objects.

Every membership change (alive, suspect, dead) and every user broadcast is queued here and
piggybacked on outgoing datagrams until it has been sent ``retransmit_limit`` times, enough
for an epidemic to reach every member with high probability. Rules, as in memberlist:

- Fresher first: items are taken in order of fewest transmissions, then largest (so big
  items are not starved by small ones), then newest.
- Invalidation by name: a new broadcast about node X replaces any queued one about X, since
  only the latest incarnation/state matters. Unnamed broadcasts (user messages) never
  invalidate each other.
- Packing: ``take(overhead, limit)`` takes items while they fit in ``limit`` bytes, charging
  ``overhead`` bytes per item (the compound-part length prefix).
- Bounded: beyond ``queue_max`` the most transmitted, oldest items are dropped.

Sizes come from ``message_size_bytes``, a conservative (never smaller) estimate of the msgpack
encoding that ``wire.py`` produces, so that packing never overflows the datagram budget.
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Callable
from dataclasses import dataclass, field

from swarmnet.gossip.config import retransmit_limit
from swarmnet.gossip.messages import (
    Ack,
    Alive,
    Dead,
    IndirectPing,
    Message,
    Nack,
    Ping,
    Suspect,
    User,
)

# A compound packet spends 2 bytes (uint16 length) per part, plus 2 bytes of header
# (type byte + part count); memberlist's compoundOverhead / compoundHeaderOverhead.
COMPOUND_PART_OVERHEAD_BYTES = 2
COMPOUND_HEADER_OVERHEAD_BYTES = 2


def _str(n: int) -> int:
    """msgpack str/bin: worst-case header (str8/bin8 is 2 bytes below 256, else 3) + data."""
    return n + (2 if n < 256 else 3)


def _uint() -> int:
    return 5  # uint32 at worst


def message_size_bytes(msg: Message) -> int:
    """Upper bound of the encoded size: type byte + msgpack map of Go field names.

    Conservative so that a packed datagram never exceeds the budget; it is within a few bytes
    of the real size for the small membership messages that dominate gossip.
    """
    if isinstance(msg, Alive):
        # keys: Addr Incarnation Meta Node Port Vsn
        return (
            2
            + 36
            + _str(len(msg.addr))
            + _uint()
            + _str(len(msg.meta))
            + _str(len(msg.node.encode("utf-8", "surrogateescape")))
            + 3
            + _str(len(msg.vsn) or 6)
        )
    if isinstance(msg, Suspect | Dead):
        # keys: From Incarnation Node
        return (
            2
            + 22
            + _str(len(msg.from_node.encode("utf-8", "surrogateescape")))
            + _uint()
            + _str(len(msg.node.encode("utf-8", "surrogateescape")))
        )
    if isinstance(msg, User):
        return 1 + len(msg.payload)
    if isinstance(msg, Ping):
        return (
            2
            + 50
            + _str(len(msg.node))
            + _uint()
            + _str(len(msg.source_addr))
            + _str(len(msg.source_node))
            + 3
        )
    if isinstance(msg, IndirectPing):
        return (
            2
            + 60
            + 1
            + _str(len(msg.node))
            + 3
            + _uint()
            + _str(len(msg.source_addr))
            + _str(len(msg.source_node))
            + 3
            + _str(len(msg.target))
        )
    if isinstance(msg, Ack):
        return 2 + 14 + _str(len(msg.payload or b"")) + _uint()
    if isinstance(msg, Nack):
        return 2 + 6 + _uint()
    raise TypeError(f"not a packet message: {type(msg).__name__}")


@dataclass(slots=True)
class _Item:
    msg: Message
    name: str | None
    size: int
    id: int
    transmits: int = 0
    on_done: Callable[[], None] | None = field(default=None, repr=False)

    def order(self) -> tuple[int, int, int]:
        return (self.transmits, -self.size, -self.id)


class BroadcastQueue:
    """Queued broadcasts with a retransmit limit that grows with log10 of the cluster size."""

    def __init__(self, retransmit_mult: int, queue_max: int):
        assert retransmit_mult >= 1 and queue_max >= 1
        self.retransmit_mult = retransmit_mult
        self.queue_max = queue_max
        self._items: list[_Item] = []  # kept sorted by _Item.order()
        self._named: dict[str, _Item] = {}
        self._ids = itertools.count(1)
        self.dropped = 0  # items pushed out by queue_max

    def __len__(self) -> int:
        return len(self._items)

    def queue(
        self,
        msg: Message,
        name: str | None = None,
        on_done: Callable[[], None] | None = None,
    ) -> None:
        """Queue ``msg``; a named one replaces the queued item of the same name.
        ``on_done`` runs once the item stops being sent (limit reached, replaced, dropped):
        a graceful leave waits for that."""
        item = _Item(msg, name, message_size_bytes(msg), next(self._ids), on_done=on_done)
        if name is not None:
            old = self._named.pop(name, None)
            if old is not None:
                self._items.remove(old)
                _finish(old)
            self._named[name] = item
        lo = bisect.bisect_right(self._items, item.order(), key=_Item.order)
        self._items.insert(lo, item)
        while len(self._items) > self.queue_max:
            old = self._items.pop()  # most transmitted, then smallest and oldest
            if old.name is not None:
                self._named.pop(old.name, None)
            self.dropped += 1
            _finish(old)

    def take(self, overhead_bytes: int, limit_bytes: int, n_nodes: int) -> list[Message]:
        """Messages that fit in ``limit_bytes`` (each charged ``overhead_bytes`` more),
        freshest first; each taken item counts one transmission."""
        if not self._items or limit_bytes <= overhead_bytes:
            return []
        tlimit = retransmit_limit(self.retransmit_mult, n_nodes)
        out: list[Message] = []
        keep: list[_Item] = []
        bumped: list[_Item] = []
        used = 0
        items = self._items
        for i, item in enumerate(items):
            free = limit_bytes - used - overhead_bytes
            if free <= 0:
                keep.extend(items[i:])
                break
            if item.size > free:
                keep.append(item)
                continue
            out.append(item.msg)
            used += overhead_bytes + item.size
            item.transmits += 1
            if item.transmits >= tlimit:
                if item.name is not None:
                    self._named.pop(item.name, None)
                _finish(item)
            else:
                bumped.append(item)
        if bumped:
            keep.extend(bumped)
            keep.sort(key=_Item.order)  # two sorted runs: timsort merges them in O(n)
        self._items = keep
        return out

    def clear(self) -> None:
        for item in self._items:
            _finish(item)
        self._items = []
        self._named.clear()

    def pending(self) -> list[Message]:
        """Queued messages in sending order (for tests and debugging)."""
        return [item.msg for item in self._items]


def _finish(item: _Item) -> None:
    if item.on_done is not None:
        cb, item.on_done = item.on_done, None
        cb()
