"""Service load balancing: desired state (``plan``), the backend interface and choice
(``backend``), and three backends: nftables (``nft``), IPVS (``ipvs``), in-memory (``fake``).
``nft`` and ``ipvs`` are kernel-boundary modules; ``plan`` is pure."""

from .backend import BackendUnavailable, LBBackend, choose_backend, ipvs_available
from .plan import Backend, LBChanges, LBError, LBService, LBState, diff

__all__ = [
    "Backend",
    "BackendUnavailable",
    "LBBackend",
    "LBChanges",
    "LBError",
    "LBService",
    "LBState",
    "choose_backend",
    "diff",
    "ipvs_available",
]
