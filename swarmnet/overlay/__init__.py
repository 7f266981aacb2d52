"""Overlay networks: desired kernel state per node (``plan``) and the level-triggered
reconciler that applies it through the kernel boundary (``reconciler``)."""

from swarmnet.overlay.plan import (
    Desired,
    LocalAttachment,
    NodeOverlay,
    OverlayNetwork,
    RemoteEndpoint,
    bridge_name,
    desired,
    mac_for_ip,
    plan,
    sandbox_name,
    veth_name,
    vxlan_name,
)
from swarmnet.overlay.reconciler import OverlayReconciler, ReconcilerStats

__all__ = [
    "Desired",
    "LocalAttachment",
    "NodeOverlay",
    "OverlayNetwork",
    "OverlayReconciler",
    "ReconcilerStats",
    "RemoteEndpoint",
    "bridge_name",
    "desired",
    "mac_for_ip",
    "plan",
    "sandbox_name",
    "veth_name",
    "vxlan_name",
]
