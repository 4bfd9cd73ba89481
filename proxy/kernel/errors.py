"""Kernel (netlink) errors as a small exception hierarchy of our own.

pyroute2 raises `NetlinkError(code, message)` for every refusal; callers here want to say
`except Exists:` rather than compare errno values. `from_netlink_error` maps one to the other and
keeps the kernel's extended-ack string ("Nexthop id does not exist", ...) when the socket had
NETLINK_EXT_ACK on, which is usually the only useful part of a netlink error.

    KernelError                 anything the kernel refused (errno, message, extack)
    ├── Exists                  EEXIST
    ├── NotFound                ENOENT, ESRCH, EADDRNOTAVAIL
    │   └── NoSuchDevice        ENODEV
    ├── Unsupported             EOPNOTSUPP, EAFNOSUPPORT, EPROTONOSUPPORT
    ├── InvalidArgument         EINVAL
    ├── PermissionDenied        EPERM, EACCES
    └── Busy                    EBUSY
"""

from __future__ import annotations

import errno as _errno
import os
from typing import Any

__all__ = [
    "Busy",
    "Exists",
    "InvalidArgument",
    "KernelError",
    "NoSuchDevice",
    "NotFound",
    "PermissionDenied",
    "Unsupported",
    "error_for",
    "from_netlink_error",
]


class KernelError(Exception):
    """The kernel refused a netlink request.

    `errno` is the positive error number, `message` its strerror text, `extack` the kernel's
    extended-ack message when it sent one (else None), `operation` a short description of what
    was attempted ("add nexthop 7"), when the caller gave one.
    """

    def __init__(
        self,
        errno: int,
        message: str | None = None,
        extack: str | None = None,
        operation: str | None = None,
    ) -> None:
        super().__init__(errno, message, extack, operation)
        self.errno = errno
        self.message = message if message is not None else os.strerror(errno)
        self.extack = extack
        self.operation = operation

    @property
    def errno_name(self) -> str:
        return _errno.errorcode.get(self.errno, str(self.errno))

    def __str__(self) -> str:
        text = f"{self.message} ({self.errno_name})"
        if self.extack:
            text = f"{self.extack}: {text}"
        if self.operation:
            text = f"{self.operation}: {text}"
        return text

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(errno={self.errno_name}, extack={self.extack!r}, "
            f"operation={self.operation!r})"
        )


class Exists(KernelError):
    """EEXIST: the object is already there (an add without replace)."""


class NotFound(KernelError):
    """ENOENT, ESRCH, EADDRNOTAVAIL: the object (or what it refers to) is not there."""


class NoSuchDevice(NotFound):
    """ENODEV: the interface index or name does not exist (in this namespace)."""


class Unsupported(KernelError):
    """EOPNOTSUPP, EAFNOSUPPORT, EPROTONOSUPPORT: this kernel cannot do it."""


class InvalidArgument(KernelError):
    """EINVAL: the kernel rejected the request's content; `extack` usually says why."""


class PermissionDenied(KernelError):
    """EPERM, EACCES: no CAP_NET_ADMIN in the namespace's user namespace."""


class Busy(KernelError):
    """EBUSY."""


_BY_ERRNO: dict[int, type[KernelError]] = {
    _errno.EEXIST: Exists,
    _errno.ENOENT: NotFound,
    _errno.ESRCH: NotFound,
    _errno.EADDRNOTAVAIL: NotFound,
    _errno.ENODEV: NoSuchDevice,
    _errno.EOPNOTSUPP: Unsupported,
    _errno.EAFNOSUPPORT: Unsupported,
    _errno.EPROTONOSUPPORT: Unsupported,
    _errno.EINVAL: InvalidArgument,
    _errno.EPERM: PermissionDenied,
    _errno.EACCES: PermissionDenied,
    _errno.EBUSY: Busy,
}


def error_for(
    errno: int,
    message: str | None = None,
    extack: str | None = None,
    operation: str | None = None,
) -> KernelError:
    """The `KernelError` subclass instance for a (positive or negative) errno."""
    code = abs(errno)
    cls = _BY_ERRNO.get(code, KernelError)
    return cls(code, message, extack, operation)


def from_netlink_error(exc: Any, operation: str | None = None) -> KernelError:
    """Translate a `pyroute2.NetlinkError` into our hierarchy.

    pyroute2 puts the kernel's extended-ack string in `args[1]` when there was one, and
    `os.strerror(code)` otherwise; so a second argument that differs from the strerror text is
    the extack message. The original exception should be chained by the caller (`raise ... from
    exc`).
    """
    code = int(getattr(exc, "code", 0) or (exc.args[0] if exc.args else 0))
    strerror = os.strerror(abs(code)) if code else None
    text = exc.args[1] if len(exc.args) > 1 else None
    extack = text if isinstance(text, str) and text and text != strerror else None
    return error_for(code, strerror, extack, operation)
