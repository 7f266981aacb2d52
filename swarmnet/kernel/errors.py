"""Kernel errors carry the errno, the operation and the object, so that a log line or an
API error says what failed on what (DESIGN principle 6)."""

from __future__ import annotations

import errno as _errno


class KernelError(Exception):
    def __init__(self, code: int, op: object = None, detail: str = ""):
        self.code = code
        self.op = op
        self.detail = detail
        name = _errno.errorcode.get(code, str(code))
        super().__init__(f"{name}: {op!r}{': ' + detail if detail else ''}")

    def is_not_found(self) -> bool:
        return self.code in (_errno.ENOENT, _errno.ENODEV, _errno.ESRCH, _errno.EADDRNOTAVAIL)

    def is_exists(self) -> bool:
        return self.code == _errno.EEXIST
