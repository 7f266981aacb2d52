"""Revoked node ids and certificate serials: what ``node rm`` leaves behind."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from swarmnet.pki.errors import RevokedCertificate

if TYPE_CHECKING:
    from swarmnet.pki.ca import NodeIdentity


@dataclass(frozen=True)
class RevocationList:
    """Node ids and certificate serials that must not act any more.

    Kept in the Raft store (replicated to every manager) and checked by the server on every
    request, not only at the handshake, so that keep-alive connections of a removed node
    stop working at once. ``node rm`` adds the node id: every certificate that names it is
    dead, including ones issued later by mistake. A serial revokes one certificate (say, a
    key known to have leaked before a renewal). Node ids are never reused (25 random base36
    characters), so the list only grows; serials can be pruned once their certificate has
    expired, which ``prune`` does given their expiry.
    """

    node_ids: frozenset[str] = frozenset()
    serials: frozenset[int] = frozenset()

    def is_revoked(self, ident: NodeIdentity) -> bool:
        return ident.node_id in self.node_ids or ident.serial in self.serials

    def check(self, ident: NodeIdentity) -> None:
        if self.is_revoked(ident):
            raise RevokedCertificate(f"node {ident.node_id} has been removed from the swarm")

    def with_nodes(self, node_ids: Iterable[str]) -> RevocationList:
        return RevocationList(self.node_ids | frozenset(node_ids), self.serials)

    def with_serials(self, serials: Iterable[int]) -> RevocationList:
        return RevocationList(self.node_ids, self.serials | frozenset(serials))

    def prune(self, expired_serials: Iterable[int]) -> RevocationList:
        return RevocationList(self.node_ids, self.serials - frozenset(expired_serials))

    def to_json(self) -> dict:
        """Serials as decimal strings: they are 159-bit integers, past JSON's safe range."""
        return {"node_ids": sorted(self.node_ids), "serials": sorted(str(s) for s in self.serials)}

    @classmethod
    def from_json(cls, data: dict | None) -> RevocationList:
        data = data or {}
        return cls(
            frozenset(str(n) for n in data.get("node_ids", ())),
            frozenset(int(s) for s in data.get("serials", ())),
        )


__all__ = ["RevocationList"]
