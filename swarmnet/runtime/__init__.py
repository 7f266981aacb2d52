"""Task sandboxes and processes: the in-sandbox launcher (``enter``) and the ``Supervisor``
that starts, watches, restarts, adopts and stops task processes.

The re-exports are lazy (PEP 562) because every task start runs
``python -m swarmnet.runtime.enter``, which imports this package first: importing ``enter``
here would make runpy warn on each start (into the task's log), and importing the
supervisor (asyncio, subprocess) would only slow the launcher down.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from swarmnet.runtime.enter import exec_argv
    from swarmnet.runtime.supervisor import (
        FAILED,
        RUNNING,
        SHUTDOWN,
        STARTING,
        PersistedTask,
        RuntimeConfig,
        RuntimeConfigError,
        StatusCallback,
        Supervisor,
        SupervisorError,
        TaskSpec,
        TaskSpecError,
        decode_state,
        encode_state,
        render_hosts,
        restart_delay,
    )

__all__ = [
    "FAILED",
    "RUNNING",
    "SHUTDOWN",
    "STARTING",
    "PersistedTask",
    "RuntimeConfig",
    "RuntimeConfigError",
    "StatusCallback",
    "Supervisor",
    "SupervisorError",
    "TaskSpec",
    "TaskSpecError",
    "decode_state",
    "encode_state",
    "exec_argv",
    "render_hosts",
    "restart_delay",
]

_HOME = {name: "swarmnet.runtime.supervisor" for name in __all__} | {
    "exec_argv": "swarmnet.runtime.enter"
}


def __getattr__(name: str) -> Any:
    if name in _HOME:
        return getattr(importlib.import_module(_HOME[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
