"""Lifeguard's local health awareness (Dadgar et al. 2017, memberlist ``awareness.go``).

A node that is itself slow (CPU starved, dropping packets) misses acks and would blame healthy
peers. Lifeguard makes it doubt itself instead: every sign of local trouble raises a health
score, every clean probe lowers it, and the node's probe interval and probe deadline are
multiplied by ``score + 1``. Signs of trouble, as in memberlist:

- +1 for a probe that failed when no peer was asked to send nacks;
- +1 per expected nack that never arrived (the peers we asked could not even tell us they
  failed: the problem is likely on our side);
- +1 when we have to refute a suspicion of ourselves;
- -1 for a successful probe.
"""

from __future__ import annotations


class Awareness:
    """Health score in 0 .. max_multiplier - 1; 0 is healthy."""

    __slots__ = ("_max", "score")

    def __init__(self, max_multiplier: int):
        assert max_multiplier >= 1, max_multiplier
        self._max = max_multiplier
        self.score = 0

    def apply_delta(self, delta: int) -> int:
        """Add ``delta``, clamp to the range, and return the new score."""
        self.score = min(max(self.score + delta, 0), self._max - 1)
        return self.score

    def scale(self, timeout_s: float) -> float:
        """``timeout_s * (score + 1)``: a sick node waits longer before blaming others."""
        return timeout_s * (self.score + 1)
