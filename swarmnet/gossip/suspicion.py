"""Lifeguard's dynamic suspicion timeout (memberlist ``suspicion.go``), without a timer.

When we suspect a member we wait before declaring it dead, to let it refute. Lifeguard starts
that wait at ``max_s`` and shrinks it towards ``min_s`` as *independent* peers confirm the
suspicion: one accuser with a bad link waits long, a crowd of accusers agree fast. The
arithmetic is a pure function (table-tested); ``Suspicion`` holds the state of one timer and
answers "when does it fire", and the core keeps that deadline in its own timer heap.
"""

from __future__ import annotations

import math


def remaining_suspicion_s(n: int, k: int, elapsed_s: float, min_s: float, max_s: float) -> float:
    """Time left before a suspicion with ``n`` of ``k`` wanted confirmations expires.

    timeout = max - log(n + 1) / log(k + 1) * (max - min), floored to whole milliseconds and
    never below ``min_s``; the result is that minus ``elapsed_s`` and may be negative (fire at
    once). With k = 0 there is nothing to wait for, so the timeout is ``min_s``.
    """
    if k <= 0:
        return min_s - elapsed_s
    frac = math.log(n + 1.0) / math.log(k + 1.0)
    raw = max_s - frac * (max_s - min_s)
    timeout_s = math.floor(1000.0 * raw + 1e-9) / 1000.0
    return max(timeout_s, min_s) - elapsed_s


class Suspicion:
    """One suspicion timer: started at ``start_s``, shrinking with confirmations.

    ``from_node`` (the first accuser) is counted as already seen so that our own suspect
    message, gossiped back to us, does not count as a confirmation.
    """

    __slots__ = ("_confirmed", "k", "max_s", "min_s", "n", "start_s", "deadline_s", "verified")

    def __init__(self, from_node: str, k: int, min_s: float, max_s: float, start_s: float):
        assert 0 < min_s <= max_s, (min_s, max_s)
        self.k = k
        self.n = 0
        self.min_s = min_s
        self.max_s = max_s
        self.start_s = start_s
        self._confirmed = {from_node}
        # memberlist starts at max, or at min when no confirmation is expected (tiny clusters).
        self.deadline_s = start_s + (max_s if k >= 1 else min_s)
        self.verified = False  # the core's last-chance probe was sent (see core._on_suspicion)

    def confirm(self, from_node: str, now: float) -> bool:
        """Count an independent confirmation; True if it was new (the caller re-gossips the
        suspicion then). Moves ``deadline_s`` earlier, possibly into the past."""
        if self.n >= self.k or from_node in self._confirmed:
            return False
        self._confirmed.add(from_node)
        self.n += 1
        remaining = remaining_suspicion_s(
            self.n, self.k, now - self.start_s, self.min_s, self.max_s
        )
        self.deadline_s = now + remaining
        return True
